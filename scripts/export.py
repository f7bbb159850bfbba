"""Export a training checkpoint's network (and its EMA) to one .safetensors weights file.

    python scripts/export.py CHECKPOINT --out model.safetensors [--config runs/<name>/config.yaml]
                             [--dtype keep|float32|bfloat16|float16] [--no-ema]

CHECKPOINT is what train.py writes under runs/<name>/checkpoints/:
  * a Lightning checkpoint file (single device, DDP): a torch.save'd dict whose "state_dict" holds the
    network under `net.<name>`. It is read with torch.load(weights_only=True) (no code can run); only if
    that refuses the file is it read with weights_only=False, which is acceptable for a checkpoint this
    project wrote, and never needed for the checkpoints vdm writes today.
  * a DeepSpeed ZeRO checkpoint directory (stage 1, 2 or 3), as Lightning's DeepSpeedStrategy writes it:
    `step-N.ckpt/latest` naming the tag (`checkpoint`), `step-N.ckpt/checkpoint/*_model_states.pt` and one
    `*_optim_states.pt` per rank. The fp32 master weights are consolidated over the ranks with
    deepspeed.utils.zero_to_fp32 (DeepSpeed is needed to export, not to read the result). The tag folder
    itself (`step-N.ckpt/checkpoint`) is accepted too.
  * a torch distributed checkpoint (DCP) directory, as Lightning's ModelParallelStrategy (vdm's FSDP2)
    writes it: `.metadata` and `__<rank>_0.distcp` shards holding `state_dict.net.<name>`, and `meta.pt`
    (the rest of Lightning's checkpoint). The network's shards are reassembled with
    torch.distributed.checkpoint in this one process (no process group).

Kept: the network's weights under their plain names, with the wrappers' prefixes stripped (Lightning's
`_forward_module.`, DeepSpeed's `module.`, then `net.`; torch.compile's `_orig_mod.` and FSDP1/activation
checkpointing's `_fsdp_wrapped_module.` / `_checkpoint_wrapped_module.` anywhere in a name). Everything
else in the checkpoint (optimizer, schedule, loops, data position) is left out.

EMA, exported under `ema.<name>`:
  * vdm's own: the top-level entry "ema" = {"weights": {name: fp32 tensor}, "num_updates": n} that
    VideoDiffusion.on_save_checkpoint writes (in a DeepSpeed directory, in the client state); or
  * a top-level checkpoint entry "ema_state_dict" (in a DeepSpeed directory: the client state in the
    model-states file, which is where Lightning puts a callback's or module's on_save_checkpoint entries;
    in a DCP directory an entry of meta.pt), a dict of tensors named like the network's, optionally
    prefixed `net.` (or `module.` as torch.optim.swa_utils.AveragedModel names them); or
  * state-dict keys `ema.net.<name>` (or `ema.module.<name>`, `ema.<name>`): an EMA copy registered as a
    submodule `ema` of the LightningModule. AveragedModel's `n_averaged` counter is dropped.
  If both exist, the top-level entry is used. The EMA must cover exactly the network's names and shapes.
  Under DeepSpeed a frozen EMA submodule is stored in the training dtype (e.g. bf16), not in fp32.

The model config is the `model` section of the run's resolved config (`--config`, by default
runs/<name>/config.yaml, two levels above a checkpoint in runs/<name>/checkpoints/), read as plain YAML
(never instantiated), minus `_target_`, plus in_channels and text_dim. Those two are read from the weights
(patch_embed.proj.weight is (width, in_channels, pt, ph, pw); caption_proj.0.weight is (width, text_dim))
and checked against the config where it tells them (the identity autoencoder's `channels`; an open_clip
text encoder's text width, from vdm/text/model_configs/<model_name>.json or open_clip's bundled config).
Finally the network the config describes is built on the meta device and its names and shapes must be
exactly the weights': a config from another run is refused, naming the first differences.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

import vdm  # first: makes torchvision importable on CPU-only torch (open_clip needs it)
from vdm.models import SpaceTimeDiT
from vdm.models.weights import model_kwargs, save_weights
from vdm.state_dicts import diff_state_dicts

LEADING_WRAPPERS = ("_forward_module.", "module.")  # Lightning's wrapper, DeepSpeed's / DDP's wrapper
INNER_WRAPPERS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}  # never a real module name
NET = "net."
EMA = "ema."
EMA_ENTRY = "ema_state_dict"
EMA_COUNTERS = ("n_averaged",)  # AveragedModel's step counter: not a weight
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_TARGETS = ("vdm.models.SpaceTimeDiT", "vdm.models.dit.SpaceTimeDiT")


class ExportError(Exception):
    """A checkpoint or config that cannot be exported; the message says why."""


def strip_wrappers(key: str) -> str:
    while True:
        for prefix in LEADING_WRAPPERS:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return ".".join(part for part in key.split(".") if part not in INNER_WRAPPERS)


# ------------------------------------------------------------------ reading checkpoints


def torch_load(path: Path) -> tuple[dict, bool]:
    """(object, weights_only) for a torch.save'd file written by this project: weights_only=True if it can."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except pickle.UnpicklingError:
        print(
            f"note: {path} holds objects weights_only=True refuses; reading it with weights_only=False "
            "(trusted: a checkpoint this project wrote)",
            file=sys.stderr,
        )
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True), False


def deepspeed_dirs(path: Path) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) if `path` is a DeepSpeed checkpoint directory or its tag folder, else None."""
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if not (path / tag).is_dir():
            raise ExportError(f"{path}/latest names tag {tag!r}, but {path / tag} does not exist")
        return path, tag
    if any(path.glob("*_model_states.pt")):
        return path.parent, path.name
    tags = [p for p in sorted(path.iterdir()) if p.is_dir() and any(p.glob("*_model_states.pt"))]
    if len(tags) == 1:
        return path, tags[0].name
    return None


def ema_entry(container) -> dict | None:
    """The EMA weights a checkpoint's top level holds: vdm's {"ema": {"weights": ...}} or an "ema_state_dict"."""
    if not isinstance(container, dict):
        return None
    vdm_ema = container.get("ema")
    if isinstance(vdm_ema, dict) and isinstance(vdm_ema.get("weights"), dict):
        return vdm_ema["weights"]
    return container.get(EMA_ENTRY)


def read_lightning(path: Path) -> dict:
    checkpoint, weights_only = torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ExportError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return {
        "layout": "lightning",
        "state_dict": checkpoint["state_dict"],
        "ema_entry": ema_entry(checkpoint),
        "step": checkpoint.get("global_step"),
        "read": f"torch.load(weights_only={weights_only})",
    }


def read_deepspeed(root: Path, tag: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading needs no accelerator
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = root / tag
    model_files = sorted(folder.glob("*_model_states.pt"))
    if not model_files:
        raise ExportError(f"{folder}: no *_model_states.pt: not a DeepSpeed checkpoint")
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:
        raise ExportError(f"{folder}: no *_optim_states.pt: not a ZeRO checkpoint (zero_to_fp32 needs them)")
    # rank 0's model-states file carries the client state (Lightning's loops, callbacks... and an EMA entry)
    first = next(
        (
            folder / name
            for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
            if (folder / name).is_file()
        ),
        model_files[0],
    )
    client, weights_only = torch_load(first)
    with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 reports its progress on stdout
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return {
        "layout": f"DeepSpeed ZeRO checkpoint ({len(optim_files)} rank{'s' if len(optim_files) > 1 else ''}, "
        f"tag {tag!r}, fp32 consolidated with zero_to_fp32)",
        "state_dict": state_dict,
        "ema_entry": ema_entry(client),
        "step": client.get("global_step") if isinstance(client, dict) else None,
        "read": f"zero_to_fp32; client state with torch.load(weights_only={weights_only})",
    }


def read_distributed_checkpoint(path: Path) -> dict:
    """A torch.distributed.checkpoint directory (Lightning's ModelParallelStrategy): only the `state_dict.*`
    tensors are read, each reassembled from every rank's shards, in this process alone."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    prefix = "state_dict."
    state_dict = {
        name[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in reader.read_metadata().state_dict_metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state_dict:
        raise ExportError(f"{path}: a distributed checkpoint without state_dict.* tensors")
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        load({"state_dict": state_dict}, storage_reader=reader, no_dist=True)
    extra, weights_only = torch_load(path / "meta.pt") if (path / "meta.pt").is_file() else ({}, True)
    shards = len(list(path.glob("*.distcp")))
    return {
        "layout": f"torch distributed checkpoint ({shards} shard file{'s' if shards > 1 else ''}, reassembled)",
        "state_dict": state_dict,
        "ema_entry": ema_entry(extra),
        "step": extra.get("global_step") if isinstance(extra, dict) else None,
        "read": f"torch.distributed.checkpoint; meta.pt with torch.load(weights_only={weights_only})",
    }


def read_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        raise ExportError(f"{path} is already a weights file")
    if path.is_dir():
        if (path / ".metadata").is_file():
            return read_distributed_checkpoint(path)
        found = deepspeed_dirs(path)
        if found is None:
            raise ExportError(
                f"{path}: a directory, but neither a DeepSpeed checkpoint (no 'latest' file, no tag folder with "
                f"*_model_states.pt) nor a distributed checkpoint (no .metadata); it holds "
                f"{sorted(p.name for p in path.iterdir())[:10]}"
            )
        return read_deepspeed(*found)
    return read_lightning(path)


# ------------------------------------------------------------------ picking the network and its EMA


def split_state(state_dict: dict, ema_entry) -> tuple[dict, dict | None, list[str]]:
    """(network weights, EMA weights or None, names left out) from a checkpoint's state dict."""
    net, ema, ignored = {}, {}, []
    for key, value in state_dict.items():
        name = strip_wrappers(key)
        if name.startswith(NET):
            net[name[len(NET) :]] = value
        elif name.startswith(EMA):
            ema[name[len(EMA) :]] = value
        else:
            ignored.append(key)
    if not net:
        raise ExportError(
            f"no network weights: no key starts with {NET!r} after the wrappers' prefixes "
            f"(first keys: {list(state_dict)[:5]})"
        )
    if ema_entry is not None:
        if not isinstance(ema_entry, dict):
            raise ExportError(f"checkpoint[{EMA_ENTRY!r}] must be a dict of tensors, got {type(ema_entry).__name__}")
        ignored += [EMA + k for k in ema]
        ema = dict(ema_entry)
    if not ema:
        return net, None, ignored
    normalized = {}
    for key, value in ema.items():
        name = strip_wrappers(key)
        name = name[len(NET) :] if name.startswith(NET) else name
        if name in EMA_COUNTERS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"EMA entry {key!r} is not a tensor ({type(value).__name__})")
        normalized[name] = value
    missing, unexpected = sorted(set(net) - set(normalized)), sorted(set(normalized) - set(net))
    if missing or unexpected:
        raise ExportError(
            f"the EMA does not cover the network's names: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return net, normalized, ignored


# ------------------------------------------------------------------ the model config


def default_config_path(checkpoint: Path) -> Path:
    """runs/<name>/config.yaml for runs/<name>/checkpoints/step-N.ckpt (or its DeepSpeed tag folder)."""
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name != "checkpoints" and checkpoint.parent.parent.name == "checkpoints":
        checkpoint = checkpoint.parent  # step-N.ckpt/checkpoint (a DeepSpeed tag folder)
    return checkpoint.parent.parent / "config.yaml"


def text_width(text: dict) -> int | None:
    """The width of an open_clip text tower named in the run config (the DiT's text_dim), or None if unknown."""
    if not str(text.get("_target_", "")).endswith("OpenCLIPTextEncoder") or "model_name" not in text:
        return None
    name = str(text["model_name"])
    local = Path(vdm.__file__).parent / "text" / "model_configs" / f"{name}.json"
    if local.is_file():
        model_config = json.loads(local.read_text())
    else:
        import open_clip

        model_config = open_clip.get_model_config(name)
    try:
        return int(model_config["text_cfg"]["width"])
    except (TypeError, KeyError, ValueError):
        return None


def autoencoder_channels(autoencoder: dict) -> int | None:
    if str(autoencoder.get("_target_", "")).endswith("IdentityAutoencoder"):
        return int(autoencoder.get("channels", 3))
    return None


def model_config(run_config: dict, net: dict[str, torch.Tensor], source: Path) -> tuple[dict, list[str]]:
    """The SpaceTimeDiT arguments for these weights, and notes on how in_channels and text_dim were checked."""
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise ExportError(f"{source}: no 'model' section")
    model = dict(run_config["model"])
    target = model.pop("_target_", None)
    if target is not None and target not in MODEL_TARGETS:
        raise ExportError(f"{source}: model._target_ is {target!r}; only {MODEL_TARGETS[0]} is exported")
    unknown = sorted(set(model) - model_kwargs())
    if unknown:
        raise ExportError(f"{source}: model has keys that are not SpaceTimeDiT arguments: {unknown}")
    for key in ("patch_embed.proj.weight", "caption_proj.0.weight"):
        if key not in net:
            raise ExportError(f"the weights have no {key}: not a SpaceTimeDiT")
    inferred = {
        "in_channels": int(net["patch_embed.proj.weight"].shape[1]),
        "text_dim": int(net["caption_proj.0.weight"].shape[1]),
    }
    told = {
        "in_channels": [
            ("model.in_channels", model.get("in_channels")),
            ("autoencoder.channels", autoencoder_channels(run_config.get("autoencoder") or {})),
        ],
        "text_dim": [
            ("model.text_dim", model.get("text_dim")),
            ("the text encoder's width", text_width(run_config.get("text") or {})),
        ],
    }
    notes = []
    for name, value in inferred.items():
        checks = [(where, said) for where, said in told[name] if said is not None]
        for where, said in checks:
            if said != value:
                raise ExportError(f"{name}: the weights say {value}, {where} in {source} says {said}")
        notes.append(
            f"{name}={value} (from the weights; "
            + (f"matches {', '.join(w for w, _ in checks)})" if checks else "not stated by the config)")
        )
        model[name] = value

    try:
        with torch.device("meta"):
            expected = SpaceTimeDiT(**model).state_dict()
    except (TypeError, ValueError) as error:
        raise ExportError(f"{source}: model config does not build a SpaceTimeDiT: {error}") from error
    diff = diff_state_dicts(expected, net)
    if diff:
        wrong = [f"{k}: weights {given} vs config {shape}" for k, given, shape in diff.wrong_shape]
        raise ExportError(
            f"the weights do not fit the model config in {source} (another run's config?): "
            f"missing {diff.missing[:5]}, unexpected {diff.unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    return model, notes


# ------------------------------------------------------------------ export


def export(
    checkpoint: str | Path, out: str | Path, config: str | Path | None = None, dtype: str = "keep", ema: bool = True
) -> dict:
    """Write `out` from `checkpoint`; returns what was written (also printed by the command line)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out must end in .safetensors (got {out})")
    if dtype != "keep" and dtype not in DTYPES:
        raise ExportError(f"--dtype must be keep or one of {sorted(DTYPES)} (got {dtype})")
    config_path = Path(config) if config is not None else default_config_path(checkpoint)
    if not config_path.is_file():
        raise ExportError(f"no model config at {config_path}: pass the run's config.yaml with --config")
    run_config = yaml.safe_load(config_path.read_text())

    started = time.perf_counter()
    found = read_checkpoint(checkpoint)
    net, ema_weights, ignored = split_state(found["state_dict"], found["ema_entry"])
    if not ema:
        ema_weights = None
    model, notes = model_config(run_config, net, config_path)
    if dtype != "keep":
        cast = lambda sd: {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
        net, ema_weights = cast(net), (cast(ema_weights) if ema_weights is not None else None)
    provenance = {"checkpoint": str(checkpoint), "layout": found["layout"], "global_step": found["step"]}
    save_weights(
        out, net, model, ema_state_dict=ema_weights, extra_metadata={"vdm_export": json.dumps(provenance, default=str)}
    )
    return {
        "out": str(out),
        "checkpoint": str(checkpoint),
        "layout": found["layout"],
        "read": found["read"],
        "step": found["step"],
        "config": str(config_path),
        "model": model,
        "notes": notes,
        "tensors": len(net),
        "parameters": sum(v.numel() for v in net.values()),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in net.values()}),
        "ema": ema_weights is not None,
        "ignored": len(ignored),
        "bytes": out.stat().st_size,
        "seconds": time.perf_counter() - started,
    }


def describe(summary: dict) -> str:
    size = summary["bytes"]
    human = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
    model = ", ".join(f"{k}={v}" for k, v in summary["model"].items())
    return "\n".join(
        [
            f"wrote {summary['out']} ({human}, {size} bytes) in {summary['seconds']:.1f} s",
            f"  from:       {summary['checkpoint']}: {summary['layout']}, step {summary['step']}; read with "
            f"{summary['read']}",
            f"  config:     {summary['config']}: {model}",
            *(f"              {note}" for note in summary["notes"]),
            f"  tensors:    {summary['tensors']} ({summary['parameters']:,} parameters, "
            f"{'/'.join(summary['dtypes'])}); {summary['ignored']} other checkpoint entries left out",
            f"  EMA:        {'yes (ema.* tensors)' if summary['ema'] else 'no'}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", help="a Lightning checkpoint file, or a DeepSpeed or distributed checkpoint directory"
    )
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--config", help="the run's config.yaml (default: <run dir>/config.yaml)")
    parser.add_argument("--dtype", default="keep", choices=["keep", *DTYPES], help="cast floating tensors")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="leave the EMA weights out")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.out, args.config, dtype=args.dtype, ema=args.ema)
    except (ExportError, ValueError, OSError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 1
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
