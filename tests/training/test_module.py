"""The training step's randomness is a function of (seed, rank, step): what exact resume builds on."""

from __future__ import annotations

import torch

from vdm.autoencoders import IdentityAutoencoder
from vdm.diffusion import RectifiedFlow
from vdm.models import SpaceTimeDiT
from vdm.seeding import derive_seed, generator_for
from vdm.text import OpenCLIPTextEncoder
from vdm.training.module import VideoDiffusion
from vdm.training.optim import AdamW


def make_module(caption_dropout: float = 0.1) -> VideoDiffusion:
    torch.manual_seed(0)
    text = OpenCLIPTextEncoder("clip-tiny")
    net = SpaceTimeDiT(in_channels=3, text_dim=text.dim, width=32, depth=1, heads=2, patch_size=(1, 4, 4))
    return VideoDiffusion(net, RectifiedFlow(), text, IdentityAutoencoder(), AdamW(), caption_dropout=caption_dropout)


def test_derived_seeds_differ_by_any_part_and_repeat_exactly():
    assert derive_seed(0, 0, 5) == derive_seed(0, 0, 5)
    assert len({derive_seed(0, 0, 5), derive_seed(0, 1, 5), derive_seed(0, 0, 6), derive_seed(1, 0, 5)}) == 4
    a = torch.randn(4, generator=generator_for(torch.device("cpu"), 3, 1, 7))
    b = torch.randn(4, generator=generator_for(torch.device("cpu"), 3, 1, 7))
    assert torch.equal(a, b)


def test_caption_dropout_rate_and_determinism():
    module = make_module(caption_dropout=0.25)
    captions = [f"caption {i}" for i in range(4000)]
    dropped = module.drop_captions(captions, generator_for(torch.device("cpu"), 0, 0, 1))
    share = sum(c == "" for c in dropped) / len(captions)
    assert 0.22 < share < 0.28
    assert all(c in ("", original) for c, original in zip(dropped, captions))
    assert dropped == module.drop_captions(captions, generator_for(torch.device("cpu"), 0, 0, 1))


def test_text_encoder_is_outside_the_module_tree():
    module = make_module()
    names = [name for name, _ in module.named_parameters()]
    assert names and all(name.startswith("net.") for name in names)
    assert not any(key.startswith("text_encoder") for key in module.state_dict())
    assert module.encode_text(["the digit 1 moves up"]).tokens.shape[-1] == module.net.text_dim
