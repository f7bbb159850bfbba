"""Export a training checkpoint's network (and its EMA) to one .safetensors weights file.

    python scripts/export.py CHECKPOINT --out model.safetensors [--config runs/<name>/config.yaml]
                             [--dtype keep|float32|bfloat16|float16] [--no-ema] [--adapters DIR]

CHECKPOINT is what train.py writes under runs/<name>/checkpoints/, in any layout: a Lightning checkpoint file
(one process, DDP), a DeepSpeed ZeRO directory (stage 1, 2, 3; DeepSpeed consolidates it, so it is needed to
export, not to read the result) or a torch distributed checkpoint directory (FSDP2). vdm/checkpoints.py knows
the layouts, how each is read (torch.load with weights_only=True; nothing is unpickled that vdm did not write)
and which names are the network's and its EMA's (exported as `ema.<name>`, whole: a ZeRO-3 or FSDP2 run keeps
its EMA as each rank's shard, and the shards are joined here, in this one process).

A LoRA run (optim.lora_rank > 0) exports as the plain network, each adapter merged into the weight it adapts
(W + alpha / r * B A); `--adapters DIR` also writes the adapters alone in peft's layout (adapter_model.safetensors
and adapter_config.json; the EMA's in DIR/ema), which peft's `set_peft_model_state_dict` loads.

Kept: the network's weights under their plain names. Everything else in the checkpoint (optimizer, schedule,
loops, data position) is left out.

The model config is the `model` section of the run's resolved config (`--config`, by default
runs/<name>/config.yaml, two levels above a checkpoint in runs/<name>/checkpoints/), read as plain YAML
(never instantiated). Its in_channels and text_dim, which train.py records there, are checked against the
weights (a config written before vdm recorded them takes them from the weights); the network it describes is
built on the meta device and its names and shapes must be exactly the weights'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from vdm.checkpoints import DTYPES, CheckpointError, export_weights, run_config_path


def export(
    checkpoint: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    dtype: str = "keep",
    ema: bool = True,
    adapters: str | Path | None = None,
) -> dict:
    """Write `out` from `checkpoint`; returns what was written (also printed by the command line)."""
    config_path = Path(config) if config is not None else run_config_path(checkpoint)
    if not config_path.is_file():
        raise CheckpointError(f"no model config at {config_path}: pass the run's config.yaml with --config")
    model = (yaml.safe_load(config_path.read_text()) or {}).get("model")
    return export_weights(checkpoint, out, model, config_path, dtype=dtype, ema=ema, adapters=adapters)


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
            *(["  LoRA:       adapters merged into the weights they adapt"] if summary["lora"] else []),
            *([f"  adapters:   {summary['adapters']} (peft's layout)"] if summary["adapters"] else []),
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
    parser.add_argument("--adapters", help="a LoRA run: also write its adapters alone to this folder, as peft does")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.out, args.config, dtype=args.dtype, ema=args.ema, adapters=args.adapters)
    except (CheckpointError, OSError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 1
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
