"""Every checkpoint layout train.py writes, known in one place: which one a path is, what it holds, reading it,
and writing its network out as a weights file.

The layouts (what runs/<name>/checkpoints/step-N.ckpt is, by strategy):
  * "file" (one process, DDP): a torch.save'd dict whose "state_dict" holds the network under `net.<name>`.
    Read with torch.load(weights_only=True), so no code can run; only a file that refuses it (vdm writes none)
    is read with weights_only=False, with a note: acceptable for a checkpoint this project wrote.
  * "deepspeed" (ZeRO stage 1, 2, 3, as Lightning's DeepSpeedStrategy writes it): a directory whose `latest`
    names the tag folder holding `*_model_states.pt` and one `*_optim_states.pt` per rank. The fp32 master
    weights are consolidated over the ranks with deepspeed.utils.zero_to_fp32. The tag folder itself is
    accepted too.
  * "distributed" (FSDP2, as Lightning's ModelParallelStrategy writes it): a torch.distributed.checkpoint
    directory, `.metadata` and one `__<rank>_0.distcp` file per rank holding `state_dict.net.<name>`, plus
    `meta.pt` (the rest of Lightning's checkpoint). The network's shards are reassembled in this one process.

The network's names lose the wrappers' prefixes (Lightning's `_forward_module.`, DeepSpeed's and DDP's
`module.`, then `net.`; torch.compile's `_orig_mod.` and activation checkpointing's wrappers anywhere).
Its EMA comes from the checkpoint's top-level "ema" entry (VideoDiffusion.on_save_checkpoint's
{"weights": ..., "num_updates": n}), else an "ema_state_dict" entry, else state-dict keys `ema.<name>` (an EMA
registered as a submodule, AveragedModel's names included); it must cover exactly the network's names. A
sharded run's EMA (vdm.distributed.shards) comes whole too: ZeRO-3's from every rank's model-states file, each
holding that rank's partitions, joined; FSDP2's is `state_dict.ema.net.<name>` in the distributed checkpoint,
reassembled with the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor

from vdm.distributed.shards import ZERO3, assemble_zero3
from vdm.models import SpaceTimeDiT
from vdm.models.lora import adapted_layers, adapter_files, lora_scales, merged
from vdm.models.weights import model_kwargs, read_weights_file, save_weights
from vdm.state_dicts import diff_state_dicts

LEADING_WRAPPERS = ("_forward_module.", "module.")  # Lightning's wrapper, DeepSpeed's / DDP's wrapper
INNER_WRAPPERS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}  # never a real module name
NET, EMA, EMA_ENTRY = "net.", "ema.", "ema_state_dict"
EMA_COUNTERS = ("n_averaged",)  # AveragedModel's step counter: not a weight
MODEL_TARGETS = ("vdm.models.SpaceTimeDiT", "vdm.models.dit.SpaceTimeDiT")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ZERO_PARTITION = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
DCP_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
WIDTHS = {"in_channels": "patch_embed.proj.weight", "text_dim": "caption_proj.0.weight"}  # shape[1] of each


class CheckpointError(ValueError):
    """A checkpoint, or a config for it, that cannot be read as asked; the message says why."""


# ------------------------------------------------------------------ which layout


@dataclass(frozen=True)
class Layout:
    kind: str  # "file", "deepspeed" or "distributed"
    path: Path  # the file, the DeepSpeed checkpoint directory (above the tag folder) or the DCP directory
    writers: int | None  # processes that wrote it; None for a file, which is whole
    tag: str | None = None  # DeepSpeed's tag folder

    def describe(self) -> str:
        ranks = f"{self.writers} rank{'s' if self.writers != 1 else ''}"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO checkpoint ({ranks}, tag {self.tag!r}, fp32 consolidated with zero_to_fp32)"
        if self.kind == "distributed":
            return f"torch distributed checkpoint ({ranks}, reassembled)"
        return "lightning"


def checkpoint_layout(path: str | Path) -> Layout:
    """The layout of a checkpoint path; a CheckpointError if it is none of them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is already a weights file")
    if path.is_file():
        return Layout("file", path, None)
    if (path / ".metadata").is_file():
        ranks = {m.group(1) for p in path.iterdir() if (m := DCP_SHARD.match(p.name))}
        return Layout("distributed", path, len(ranks) or None)
    root, tag = deepspeed_tag(path)
    ranks = {m.group(1) for p in (root / tag).iterdir() if (m := ZERO_PARTITION.match(p.name))}
    return Layout("deepspeed", root, len(ranks) or None, tag)


def deepspeed_tag(path: Path) -> tuple[Path, str]:
    """(checkpoint directory, tag) of a DeepSpeed checkpoint directory or of its tag folder."""
    if (path / "latest").is_file():  # DeepSpeed names the tag folder of the latest save here
        tag = (path / "latest").read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path}/latest names tag {tag!r}, but {path / tag} does not exist")
        return path, tag
    if any(path.glob("*_model_states.pt")):
        return path.parent, path.name
    tags = [p for p in sorted(path.iterdir()) if p.is_dir() and any(p.glob("*_model_states.pt"))]
    if len(tags) == 1:
        return path, tags[0].name
    raise CheckpointError(
        f"{path}: a directory, but neither a DeepSpeed checkpoint (no 'latest' file, no tag folder with "
        f"*_model_states.pt) nor a distributed checkpoint (no .metadata); it holds "
        f"{sorted(p.name for p in path.iterdir())[:10]}"
    )


# ------------------------------------------------------------------ what it holds


@dataclass
class Checkpoint:
    layout: Layout
    state_dict: dict[str, Tensor]  # the network's (and a submodule EMA's) tensors, under the wrappers' names
    ema_entry: dict | None  # a top-level EMA entry, if the checkpoint has one
    step: int | None
    read: str  # how it was read, for the user


def torch_load(path: Path) -> tuple[object, bool]:
    """(object, weights_only) of a torch.save'd file this project wrote: weights_only=True where it can."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except pickle.UnpicklingError:
        print(
            f"note: {path} holds objects weights_only=True refuses; reading it with weights_only=False "
            "(trusted: a checkpoint this project wrote)",
            file=sys.stderr,
        )
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True), False


def read_checkpoint(path: str | Path) -> Checkpoint:
    layout = checkpoint_layout(path)
    if layout.kind == "deepspeed":
        return read_deepspeed(layout)
    if layout.kind == "distributed":
        return read_distributed(layout)
    checkpoint, weights_only = torch_load(layout.path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{layout.path}: not a Lightning checkpoint (no 'state_dict' entry)")
    read = f"torch.load(weights_only={weights_only})"
    return Checkpoint(layout, checkpoint["state_dict"], ema_entry(checkpoint), checkpoint.get("global_step"), read)


def read_deepspeed(layout: Layout) -> Checkpoint:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading needs no accelerator
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = layout.path / layout.tag
    if not any(folder.glob("*_optim_states.pt")):
        raise CheckpointError(f"{folder}: no *_optim_states.pt: not a ZeRO checkpoint (zero_to_fp32 needs them)")
    client, weights_only = deepspeed_client_state(layout)
    with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 reports its progress on stdout
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(layout.path), tag=layout.tag)
    read = f"zero_to_fp32; client state with torch.load(weights_only={weights_only})"
    if zero3_ema_layout(client):
        ema, read = zero3_ema(folder, client), read + "; the EMA joined from every rank's ZeRO-3 partitions"
    else:
        ema = ema_entry(client)
    return Checkpoint(layout, state_dict, ema, client.get("global_step"), read)


def deepspeed_client_state(layout: Layout) -> tuple[dict, bool]:
    """(client state, read with weights_only) of a DeepSpeed checkpoint: rank 0's model-states file carries it
    (Lightning's loops, callbacks... and the EMA entry)."""
    folder = layout.path / layout.tag
    model_files = sorted(folder.glob("*_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{folder}: no *_model_states.pt: not a DeepSpeed checkpoint")
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    first = next((folder / name for name in names if (folder / name).is_file()), model_files[0])
    client, weights_only = torch_load(first)
    return (client if isinstance(client, dict) else {}), weights_only


def zero3_ema_layout(client: dict) -> dict | None:
    """The layout of a ZeRO-3 run's EMA (vdm.distributed.shards), whose entry in each rank's model-states file
    holds that rank's partitions; None for any other checkpoint."""
    entry = client.get("ema")
    shards = entry.get("shards") if isinstance(entry, dict) else None
    return shards if isinstance(shards, dict) and shards.get("kind") == ZERO3 else None


def zero3_ema(folder: Path, client: dict) -> dict[str, Tensor]:
    """A ZeRO-3 run's whole EMA: each parameter's partitions, from every rank's model-states file, joined."""
    shards = zero3_ema_layout(client)
    parts = []
    for rank in range(shards["world_size"]):
        files = sorted(folder.glob(f"zero_pp_rank_{rank}_mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(
                f"{folder}: no zero_pp_rank_{rank}_mp_rank_*_model_states.pt, which holds rank {rank}'s part of the "
                f"EMA (partitioned over {shards['world_size']} ranks)"
            )
        entry = torch_load(files[0])[0].get("ema")
        if not isinstance(entry, dict) or not isinstance(entry.get("weights"), dict):
            raise CheckpointError(f"{files[0]}: no EMA partitions in its 'ema' entry")
        parts.append(entry["weights"])
    try:
        return {name: assemble_zero3([p[name] for p in parts], shape) for name, shape in shards["shapes"].items()}
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{folder}: the ranks' EMA partitions do not fit together: {error}") from error


def read_distributed(layout: Layout) -> Checkpoint:
    """Only the `state_dict.*` tensors, each reassembled from every rank's shards, in this process alone."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(layout.path))
    prefix = "state_dict."
    state_dict = {
        name[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in reader.read_metadata().state_dict_metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state_dict:
        raise CheckpointError(f"{layout.path}: a distributed checkpoint without state_dict.* tensors")
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        load({"state_dict": state_dict}, storage_reader=reader, no_dist=True)
    meta_file = layout.path / "meta.pt"
    extra, weights_only = torch_load(meta_file) if meta_file.is_file() else ({}, True)
    extra = extra if isinstance(extra, dict) else {}
    read = f"torch.distributed.checkpoint; meta.pt with torch.load(weights_only={weights_only})"
    return Checkpoint(layout, state_dict, ema_entry(extra), extra.get("global_step"), read)


def ema_entry(container: dict) -> dict | None:
    """The EMA weights a checkpoint's top level holds: vdm's {"ema": {"weights": ...}} or an "ema_state_dict"."""
    vdm_ema = container.get("ema")
    if isinstance(vdm_ema, dict) and "shards" in vdm_ema:
        return None  # sharded: ZeRO-3's partitions are joined by zero3_ema, FSDP2's are state_dict.ema.* tensors
    if isinstance(vdm_ema, dict) and isinstance(vdm_ema.get("weights"), dict):
        return vdm_ema["weights"]
    return container.get(EMA_ENTRY)


# ------------------------------------------------------------------ the network and its EMA


@dataclass
class NetworkWeights:
    net: dict[str, Tensor]  # under SpaceTimeDiT's own names (LoRA adapters merged in)
    ema: dict[str, Tensor] | None
    ignored: list[str] = field(default_factory=list)  # the checkpoint's other state-dict entries
    adapted: dict[str, Tensor] | None = None  # a LoRA run's network as it trained (base layers, adapters, scales)
    adapted_ema: dict[str, Tensor] | None = None  # and its EMA


def strip_wrappers(key: str) -> str:
    while True:
        for prefix in LEADING_WRAPPERS:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return ".".join(part for part in key.split(".") if part not in INNER_WRAPPERS)


def network_weights(state_dict: dict, ema_entry: dict | None = None) -> NetworkWeights:
    """The network's weights (and its EMA's, or None) in a checkpoint's state dict."""
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
        raise CheckpointError(
            f"no network weights: no key starts with {NET!r} after the wrappers' prefixes "
            f"(first keys: {list(state_dict)[:5]})"
        )
    if ema_entry is not None:
        if not isinstance(ema_entry, dict):
            raise CheckpointError(
                f"the checkpoint's EMA entry must be a dict of tensors, not {type(ema_entry).__name__}"
            )
        ignored += [EMA + k for k in ema]
        ema = dict(ema_entry)
    adapted = net if adapted_layers(net) else None
    net = merged(net)
    if not ema:
        return NetworkWeights(net, None, ignored, adapted)
    normalized = {}
    for key, value in ema.items():
        name = strip_wrappers(key)
        name = name[len(NET) :] if name.startswith(NET) else name
        if name in EMA_COUNTERS:
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"EMA entry {key!r} is not a tensor ({type(value).__name__})")
        normalized[name] = value
    adapted_ema = {**normalized, **lora_scales(adapted)} if adapted is not None else None
    normalized = merged(normalized, scales=lora_scales(adapted or {}))
    missing, unexpected = sorted(set(net) - set(normalized)), sorted(set(normalized) - set(net))
    if missing or unexpected:
        raise CheckpointError(
            f"the EMA does not cover the network's names: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return NetworkWeights(net, normalized, ignored, adapted, adapted_ema)


# ------------------------------------------------------------------ the model config


def run_config_path(checkpoint: str | Path) -> Path:
    """runs/<name>/config.yaml for runs/<name>/checkpoints/step-N.ckpt (or its DeepSpeed tag folder)."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.name != "checkpoints" and checkpoint.parent.parent.name == "checkpoints":
        checkpoint = checkpoint.parent  # step-N.ckpt/checkpoint (a DeepSpeed tag folder)
    return checkpoint.parent.parent / "config.yaml"


def model_arguments(model: dict, net: dict[str, Tensor], source: str | Path) -> tuple[dict, list[str]]:
    """The SpaceTimeDiT arguments for these weights from a run config's `model` section, and notes on the widths.

    train.py records in_channels and text_dim (what the autoencoder and text encoder supplied) in the run's
    config.yaml; they are checked against the weights. A config that lacks them (written before vdm recorded
    them) takes them from the weights. Then the network the arguments describe is built on the meta device and
    its names and shapes must be exactly the weights': another run's config is refused, naming the differences.
    """
    if not isinstance(model, dict):
        raise CheckpointError(f"{source}: no 'model' section")
    model = dict(model)
    target = model.pop("_target_", None)
    if target is not None and target not in MODEL_TARGETS:
        raise CheckpointError(f"{source}: model._target_ is {target!r}; only {MODEL_TARGETS[0]} is read")
    unknown = sorted(set(model) - model_kwargs())
    if unknown:
        raise CheckpointError(f"{source}: model has keys that are not SpaceTimeDiT arguments: {unknown}")
    notes = []
    for name, key in WIDTHS.items():
        if key not in net:
            raise CheckpointError(f"the weights have no {key}: not a SpaceTimeDiT")
        found, stated = int(net[key].shape[1]), model.get(name)
        if stated is not None and stated != found:
            raise CheckpointError(f"{name}: the weights say {found}, model.{name} in {source} says {stated}")
        notes.append(f"{name}={found} (from the weights; {'matches the config' if stated else 'not in the config'})")
        model[name] = found
    try:
        with torch.device("meta"):
            expected = SpaceTimeDiT(**model).state_dict()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: model config does not build a SpaceTimeDiT: {error}") from error
    diff = diff_state_dicts(expected, net)
    if diff:
        wrong = [f"{k}: weights {given} vs config {shape}" for k, given, shape in diff.wrong_shape]
        raise CheckpointError(
            f"the weights do not fit the model config in {source} (another run's config?): "
            f"missing {diff.missing[:5]}, unexpected {diff.unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    return model, notes


def load_network(path: str | Path, model: dict, source: str | Path, ema: bool = False) -> SpaceTimeDiT:
    """The network (or its EMA) of a checkpoint, built from the run config's `model` section, in eval mode."""
    checkpoint = read_checkpoint(path)
    weights = network_weights(checkpoint.state_dict, checkpoint.ema_entry)
    arguments, _ = model_arguments(model, weights.net, source)
    if ema and weights.ema is None:
        raise CheckpointError(f"{path}: EMA weights asked for, but the checkpoint holds none")
    with torch.device("meta"):  # no initialization that the checkpoint's weights would overwrite
        net = SpaceTimeDiT(**arguments)
    net.load_state_dict(weights.ema if ema else weights.net, strict=True, assign=True)
    return net.eval()


def read_weights(path: str | Path, ema: bool = False) -> tuple[dict, dict[str, Tensor]]:
    """(SpaceTimeDiT arguments, network weights or its EMA's) of a weights file or of any training checkpoint.

    A checkpoint's model arguments come from its run's config.yaml (runs/<name>/config.yaml above
    runs/<name>/checkpoints/), checked against its weights as `model_arguments` does.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_weights_file(path, ema=ema)
    config_path = run_config_path(path)
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no run config at {config_path} to build its network from")
    checkpoint = read_checkpoint(path)
    weights = network_weights(checkpoint.state_dict, checkpoint.ema_entry)
    arguments, _ = model_arguments(
        (yaml.safe_load(config_path.read_text()) or {}).get("model"), weights.net, config_path
    )
    if ema and weights.ema is None:
        raise CheckpointError(f"{path}: EMA weights asked for, but the checkpoint holds none")
    return arguments, weights.ema if ema else weights.net


# ------------------------------------------------------------------ writing the weights file


def export_weights(
    path: str | Path,
    out: str | Path,
    model: dict,
    source: str | Path,
    dtype: str = "keep",
    ema: bool = True,
    adapters: str | Path | None = None,
) -> dict:
    """Write the network (and, if `ema`, its EMA as `ema.<name>`) of the checkpoint at `path` to the weights
    file `out`, with the model arguments `model_arguments` finds from `model`; returns what was written.

    A LoRA run's adapters are merged into the weights they adapt. `adapters` (a folder) also writes them alone
    in peft's layout (vdm/models/lora.py), and, with `ema`, its EMA's in `<adapters>/ema`."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"the weights file must end in .safetensors (got {out})")
    if dtype != "keep" and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be keep or one of {sorted(DTYPES)} (got {dtype})")
    started = time.perf_counter()
    checkpoint = read_checkpoint(path)
    weights = network_weights(checkpoint.state_dict, checkpoint.ema_entry)
    net, ema_weights = weights.net, weights.ema if ema else None
    arguments, notes = model_arguments(model, net, source)
    if dtype != "keep":
        cast = lambda sd: {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
        net, ema_weights = cast(net), (cast(ema_weights) if ema_weights is not None else None)
    layout = checkpoint.layout.describe()
    provenance = {"checkpoint": str(path), "layout": layout, "global_step": checkpoint.step}
    metadata = {"vdm_export": json.dumps(provenance, default=str)}
    save_weights(out, net, arguments, ema_state_dict=ema_weights, extra_metadata=metadata)
    if adapters is not None:
        if weights.adapted is None:
            raise CheckpointError(f"{path}: holds no LoRA adapters (the run had optim.lora_rank=0)")
        adapter_files(weights.adapted, adapters)
        if ema and weights.adapted_ema is not None:
            adapter_files(weights.adapted_ema, Path(adapters) / "ema")
    return {
        "out": str(out),
        "checkpoint": str(path),
        "layout": layout,
        "read": checkpoint.read,
        "step": checkpoint.step,
        "config": str(source),
        "model": arguments,
        "notes": notes,
        "tensors": len(net),
        "parameters": sum(v.numel() for v in net.values()),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in net.values()}),
        "ema": ema_weights is not None,
        "lora": weights.adapted is not None,
        "adapters": None if adapters is None else str(adapters),
        "ignored": len(weights.ignored),
        "bytes": out.stat().st_size,
        "seconds": time.perf_counter() - started,
    }
