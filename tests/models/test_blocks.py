from __future__ import annotations

import pytest
import torch

from vdm.models.blocks import SpaceTimeBlock

B, T, S, D, L = 2, 4, 6, 32, 5


def randomize(module: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=std)


def inputs(temporal: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, S, D, generator=g)
    context = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    modulation = torch.zeros(B, 9, D)
    temporal_modulation = torch.zeros(B, 3, D) if temporal else None
    return x, context, mask, modulation, temporal_modulation


@pytest.mark.parametrize("temporal", [True, False])
def test_fresh_block_is_identity(temporal):
    torch.manual_seed(0)
    block = SpaceTimeBlock(D, heads=4, temporal=temporal)
    x, *rest = inputs(temporal)
    assert torch.equal(block(x, *rest), x)
    randomize(block)
    assert not torch.allclose(block(x, *rest), x)


def test_global_modulation_alone_opens_the_gates():
    # adaLN-single: the DiT's global vector is added to the block table, so it can move a fresh block
    torch.manual_seed(0)
    block = SpaceTimeBlock(D, heads=4)
    x, context, mask, modulation, temporal_modulation = inputs()
    out = block(x, context, mask, torch.randn_like(modulation) * 0.1, temporal_modulation)
    assert not torch.allclose(out, x)


def test_without_temporal_frames_are_independent():
    torch.manual_seed(0)
    block = SpaceTimeBlock(D, heads=4, temporal=False)
    randomize(block)
    x, *rest = inputs(temporal=False)
    changed = x.clone()
    changed[:, 0] += torch.randn(B, S, D)
    out, out_changed = block(x, *rest), block(changed, *rest)
    assert torch.equal(out[:, 3], out_changed[:, 3])
    assert not torch.allclose(out[:, 0], out_changed[:, 0])


def test_with_temporal_frames_interact():
    torch.manual_seed(0)
    block = SpaceTimeBlock(D, heads=4, temporal=True)
    randomize(block)
    x, *rest = inputs(temporal=True)
    changed = x.clone()
    changed[:, 0] += torch.randn(B, S, D)
    assert not torch.allclose(block(x, *rest)[:, 3], block(changed, *rest)[:, 3])


def test_temporal_branch_knows_frame_order():
    # Without a position encoding, attention across frames would commute with reversing the frames.
    torch.manual_seed(0)
    block = SpaceTimeBlock(D, heads=4, temporal=True)
    randomize(block, std=0.3)  # large enough that attention is far from uniform
    x, *rest = inputs(temporal=True)
    reversed_out = block(x.flip(1), *rest).flip(1)
    assert (reversed_out - block(x, *rest)).abs().max() > 1e-3

    image_block = SpaceTimeBlock(D, heads=4, temporal=False)
    randomize(image_block, std=0.3)
    x, *rest = inputs(temporal=False)
    torch.testing.assert_close(image_block(x.flip(1), *rest).flip(1), image_block(x, *rest))


def test_temporal_parameters_are_separate_from_image_parameters():
    image = SpaceTimeBlock(D, heads=4, temporal=False)
    video = SpaceTimeBlock(D, heads=4, temporal=True)
    assert image.enable_temporal is False and video.enable_temporal is True
    image_keys, video_keys = set(image.state_dict()), set(video.state_dict())
    extra = video_keys - image_keys
    assert image_keys <= video_keys
    assert extra and all(k.startswith(("temporal_attn.", "temporal_modulation")) for k in extra)
    # same shapes for shared names, so loading by name works
    for k in image_keys:
        assert image.state_dict()[k].shape == video.state_dict()[k].shape
    assert video.modulation.shape == (9, D) and video.temporal_modulation.shape == (3, D)


def test_masked_text_tokens_do_not_change_the_block_output():
    torch.manual_seed(0)
    block = SpaceTimeBlock(D, heads=4)
    randomize(block)
    x, context, mask, mod, tmod = inputs()
    changed = context.clone()
    changed[1, 3:] = 50.0
    assert torch.equal(block(x, context, mask, mod, tmod), block(x, changed, mask, mod, tmod))


def test_temporal_block_requires_temporal_modulation():
    block = SpaceTimeBlock(D, heads=4, temporal=True)
    x, context, mask, mod, _ = inputs()
    with pytest.raises(ValueError, match="temporal_modulation"):
        block(x, context, mask, mod, None)
