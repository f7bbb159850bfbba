"""Models read from a local folder as Hugging Face libraries write it (config.json and safetensors), or built from a
config with random weights: the checks every such frozen part (the T5 encoder, the diffusers VAEs) makes first.

Nothing is downloaded, and a folder that holds only pickled weights is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "diffusion_pytorch_model.bin")
DTYPES = ("float32", "bfloat16", "float16")


def check_source(path: str | Path | None, config: dict | None, what: str, dtype: str) -> torch.dtype:
    """Exactly one of a local folder `path` (config.json and .safetensors weights) and a random-weights `config`;
    returns the torch dtype named by `dtype`. ValueError saying what is wrong otherwise."""
    if (path is None) == (config is None):
        raise ValueError(f"give exactly one of path (a local {what} folder) and config (random weights)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if path is not None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a {what} folder (no config.json)")
        if not any(path.glob("*.safetensors")):
            pickled = [name for name in PICKLED if (path / name).exists()]
            hint = f" ({pickled} are pickles, never read here)" if pickled else ""
            raise ValueError(f"{path}: no .safetensors weights{hint}")
    return getattr(torch, dtype)
