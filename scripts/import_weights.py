"""Import a public image checkpoint as a vdm weights file, which `init_from` loads into an image or a video model.

    python scripts/import_weights.py --format pixart --src <diffusers transformer folder or .safetensors>
                                     --out pixart.safetensors [--heads N] [--sample-size N]
                                     [--dtype keep|float32|bfloat16|float16]

--format pixart: PixArt-alpha and PixArt-Sigma in diffusers' layout (`PixArtTransformer2DModel`, the
`transformer/` folder of a pipeline: config.json and diffusion_pytorch_model.safetensors, sharded or not). The
mapping of their tensor names to vdm's is a table in vdm/models/external.py; the model arguments that make
vdm's SpaceTimeDiT compute what theirs does (no pooled text, no qk-norm, PixArt's cross-attention, output
modulation, position grid and learned-sigma channels) are written into the file beside the weights. A bare
.safetensors file with no config.json beside it needs --heads and --sample-size (they are not in its shapes).
Only safetensors are read; pickled .bin files are refused.

It prints the model overrides a run needs to build the same network, e.g. for an inflated video model:

    python train.py init_from=pixart.safetensors model.temporal=true <printed model.* overrides> ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from vdm.checkpoints import DTYPES
from vdm.models.external import FORMATS, import_weights
from vdm.models.weights import save_weights

SUPPLIED = ("in_channels", "text_dim")  # train.py takes these from the autoencoder and the text encoder


def model_overrides(arguments: dict) -> list[str]:
    """The `model.<key>=<value>` overrides that make train.py build the network `arguments` describe."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ",".join(map(str, v)) + "]"
        return str(v)

    return [f"model.{k}={value(v)}" for k, v in arguments.items() if k not in SUPPLIED]


def run(fmt: str, src: str | Path, out: str | Path, overrides: dict, dtype: str = "keep") -> dict:
    """Import `src` and write `out`; returns what was written."""
    arguments, state = import_weights(fmt, src, overrides)
    if dtype != "keep":
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    path = save_weights(out, state, arguments, extra_metadata={"vdm_import_format": fmt, "vdm_imported_from": str(src)})
    return {
        "out": str(path),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "arguments": arguments,
        "overrides": model_overrides(arguments),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--src", required=True, help="a diffusers model folder, or a .safetensors file")
    parser.add_argument("--out", required=True, help="the vdm weights file to write (.safetensors)")
    parser.add_argument("--heads", type=int, help="attention heads, when no config.json gives them")
    parser.add_argument("--sample-size", type=int, help="the latent sample size, when no config.json gives it")
    parser.add_argument("--dtype", default="keep", choices=["keep", *DTYPES], help="cast floating tensors")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in (("num_attention_heads", args.heads), ("sample_size", args.sample_size))
        if value is not None
    }
    try:
        summary = run(args.format, args.src, args.out, overrides, dtype=args.dtype)
    except (ValueError, OSError) as error:
        print(f"import_weights: error: {error}", file=sys.stderr)
        return 1
    text = summary["arguments"]
    print(f"wrote {summary['out']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters")
    print(f"  text width {text['text_dim']}, {text['in_channels']} latent channels")
    print(f"  model overrides for train.py: {' '.join(summary['overrides'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
