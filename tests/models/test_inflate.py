"""Inflation: an image SpaceTimeDiT into a video one that computes the image model on every frame, proved by the
parity check, which also refuses (and locates) an inflation that does not."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange, repeat

from vdm.models import SpaceTimeDiT
from vdm.models.inflate import inflate, parity, probe_inputs
from vdm.models.param_groups import is_temporal
from vdm.types import TextCond

CONFIG = dict(in_channels=3, text_dim=16, width=32, depth=2, heads=2, patch_size=[1, 2, 2])


def trained_image_model(seed: int = 0, **overrides) -> SpaceTimeDiT:
    """An image model whose every tensor matters (a fresh one has zero gates and a zero output layer)."""
    torch.manual_seed(seed)
    net = SpaceTimeDiT(**{**CONFIG, **overrides, "temporal": False})
    with torch.no_grad():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def video_model(**overrides) -> SpaceTimeDiT:
    torch.manual_seed(1)
    return SpaceTimeDiT(**{**CONFIG, **overrides}).eval()


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_the_inflated_model_is_the_image_model_on_every_frame(frames):
    image = trained_image_model()
    video = video_model()
    report = inflate(video, image.state_dict())
    assert sorted(report.copied) == sorted(image.state_dict()) and not report.reshaped and not report.unused
    assert report.created and all(is_temporal(name) for name in report.created)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, frames, 8, 8, generator=g)  # frames that differ: each is scored on its own
    cond = TextCond(torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 16))
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        out = video(x, t, cond)
        each = image(
            rearrange(x, "b c t h w -> (b t) c 1 h w"),
            t.repeat_interleave(frames),
            TextCond(*(v.repeat_interleave(frames, dim=0) for v in (cond.tokens, cond.mask, cond.pooled))),
        )
    expected = rearrange(each, "(b t) c 1 h w -> b c t h w", t=frames)
    assert (out - expected).abs().max() <= 1e-5
    result = parity(image, video)
    assert result["passed"] and result["max_abs_diff"] <= 1e-5 and result["first_difference"] is None


def test_a_temporal_patch_is_inflated_for_static_clips():
    image = trained_image_model()
    video = video_model(patch_size=[2, 2, 2])
    report = inflate(video, image.state_dict())
    assert [name for name, _, _ in report.reshaped] == [
        "patch_embed.proj.weight",
        "final.linear.weight",
        "final.linear.bias",
    ]
    assert report.reshaped[0][1:] == ([32, 3, 1, 2, 2], [32, 3, 2, 2, 2])
    x, t, cond = probe_inputs(video)
    assert torch.equal(x[:, :, 0], x[:, :, 1])  # the probe clip is static where a patch spans frames
    with torch.no_grad():
        expected = repeat(image(x[:, :, :1], t, cond), "b c 1 h w -> b c t h w", t=x.shape[2])
        assert (video(x, t, cond) - expected).abs().max() <= 1e-5
    assert parity(image, video)["passed"]


def test_a_different_depth_is_refused_or_caught_by_the_parity_check():
    image = trained_image_model()
    deeper = video_model(depth=3)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(ValueError, match="non-temporal tensors"):
        inflate(deeper, image.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in deeper.state_dict().items())  # refused: nothing changed

    report = inflate(deeper, image.state_dict(), strict=False)  # what matches is loaded ...
    assert any(name.startswith("blocks.2.") and not is_temporal(name) for name in report.created)
    result = parity(image, deeper)  # ... and the check says the result is not the image model, and where
    assert not result["passed"] and result["max_abs_diff"] > 1e-3
    assert result["first_difference"]["stage"] == "final"  # blocks 0, 1 agree; block 2 changes what follows


def test_the_parity_check_names_the_first_block_that_differs():
    image = trained_image_model()
    video = video_model()
    inflate(video, image.state_dict())
    with torch.no_grad():  # a temporal gate that is not zero: block 1's temporal branch now adds something
        video.blocks[1].temporal_modulation[2].fill_(0.5)
    result = parity(image, video)
    assert not result["passed"] and result["first_difference"]["stage"] == "blocks.1"


def test_a_shape_that_does_not_inflate_is_refused():
    image = trained_image_model(width=64, heads=2)
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight is \[64, 3, 1, 2, 2\] in the image model"):
        inflate(video_model(), image.state_dict())
