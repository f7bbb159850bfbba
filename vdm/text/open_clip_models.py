"""open_clip models built the way vdm builds them: vdm's own configs registered, the random init a function of a
seed alone, open_clip's build logging kept out of run logs. The only place, with the encoder, that imports open_clip:
evaluation (CLIP score) builds its models here too.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import open_clip
import torch
from torch import nn

# Our own open_clip configs (clip-tiny: tests and laptop runs) join open_clip's registry, so that
# open_clip.create_model and open_clip.get_tokenizer know them by name.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


@contextlib.contextmanager
def root_logging_at(level: int):
    """open_clip reports each step of building a model on the root logger; keep that out of run logs
    (and its "no pretrained weights" warning, which random init by design always triggers)."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, level))
    try:
        yield
    finally:
        root.setLevel(previous)


def create_model(model_name: str, pretrained: str | None = None, seed: int = 0) -> nn.Module:
    """An open_clip model; without `pretrained`, random weights that depend only on (model_name, seed), drawn
    without reading or changing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with root_logging_at(logging.ERROR if pretrained is None else logging.WARNING):
            return open_clip.create_model(model_name, pretrained=pretrained)


def get_tokenizer(model_name: str):
    with root_logging_at(logging.WARNING):
        return open_clip.get_tokenizer(model_name)


def image_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the image tower expects its RGB input normalized with (open_clip's preprocessing)."""
    config = getattr(model.visual, "preprocess_cfg", {})
    return config.get("mean", open_clip.OPENAI_DATASET_MEAN), config.get("std", open_clip.OPENAI_DATASET_STD)
