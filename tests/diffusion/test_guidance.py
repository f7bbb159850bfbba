from __future__ import annotations

import pytest
import torch

from vdm.diffusion import cat_text_conds, classifier_free_guidance
from vdm.models import SpaceTimeDiT
from vdm.types import TextCond

DT = 16  # text width


def text(batch: int, length: int, seed: int, padded: bool = True) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if padded:
        mask[0, length - 2 :] = False
    return TextCond(torch.randn(batch, length, DT, generator=g), mask, torch.randn(batch, DT, generator=g))


@pytest.fixture(scope="module")
def net() -> SpaceTimeDiT:
    torch.manual_seed(0)
    model = SpaceTimeDiT(in_channels=3, text_dim=DT, width=32, depth=1, heads=2, patch_size=(1, 2, 2))
    with torch.no_grad():  # the zero init would make every output 0
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, 3, 2, 4, 4, generator=g), torch.rand(batch, generator=g)


def test_cat_text_conds_pads_the_shorter():
    a, b = text(2, 5, seed=1), text(3, 3, seed=2)
    both = cat_text_conds(a, b)
    assert both.tokens.shape == (5, 5, DT) and both.mask.shape == (5, 5) and both.pooled.shape == (5, DT)
    assert torch.equal(both.tokens[:2], a.tokens) and torch.equal(both.mask[:2], a.mask)
    assert torch.equal(both.tokens[2:, :3], b.tokens) and torch.equal(both.mask[2:, :3], b.mask)
    assert not both.mask[2:, 3:].any() and not both.tokens[2:, 3:].any()


@pytest.mark.parametrize("uncond_length", [5, 3, 7])
@pytest.mark.parametrize("scale", [0.0, 1.0, 4.5])
def test_batched_guidance_equals_two_forwards(net, scale, uncond_length):
    x, t = inputs()
    cond, uncond = text(2, 5, seed=1), text(2, uncond_length, seed=2)
    with torch.no_grad():
        v_cond, v_uncond = net(x, t, cond), net(x, t, uncond)
        guided = classifier_free_guidance(net, cond, uncond, scale)(x, t)
    torch.testing.assert_close(guided, v_uncond + scale * (v_cond - v_uncond))
    if scale == 0.0:
        torch.testing.assert_close(guided, v_uncond)
    if scale == 1.0:
        assert torch.equal(guided, v_cond)


def test_single_uncond_serves_the_batch(net):
    x, t = inputs(3)
    cond, uncond = text(3, 5, seed=1), text(1, 2, seed=2, padded=False)
    many = TextCond(uncond.tokens.expand(3, -1, -1), uncond.mask.expand(3, -1), uncond.pooled.expand(3, -1))
    with torch.no_grad():
        expected = classifier_free_guidance(net, cond, many, 3.0)(x, t)
        guided = classifier_free_guidance(net, cond, uncond, 3.0)(x, t)
    torch.testing.assert_close(guided, expected)
    with pytest.raises(ValueError, match="uncond"):
        classifier_free_guidance(net, cond, text(2, 2, seed=3), 3.0)


def test_one_batched_forward_and_none_extra_at_scale_one():
    batches = []

    def fake_net(x, t, cond):
        batches.append(x.shape[0])
        return x * cond.pooled.mean(dim=1).reshape(-1, 1, 1, 1, 1)

    x, t = inputs()
    cond, uncond = text(2, 5, seed=1), text(2, 3, seed=2)
    classifier_free_guidance(fake_net, cond, uncond, 2.0)(x, t)
    classifier_free_guidance(fake_net, cond, uncond, 1.0)(x, t)
    assert batches == [4, 2]


def test_guidance_interval_is_per_sample():
    # inside [0.3, 0.6] guided, outside the conditional output alone (Kynkäänniemi et al. 2024)
    x, _ = inputs(4)
    t = torch.tensor([0.2, 0.3, 0.6, 0.9])
    cond, uncond = text(4, 5, seed=1), text(4, 3, seed=2)
    fake_net = lambda x, t, cond: x * cond.pooled.mean(dim=1).reshape(-1, 1, 1, 1, 1)
    out_cond, out_uncond = fake_net(x, t, cond), fake_net(x, t, uncond)
    guided = classifier_free_guidance(fake_net, cond, uncond, 3.0, interval=(0.3, 0.6))(x, t)
    everywhere = out_uncond + 3.0 * (out_cond - out_uncond)
    inside = torch.tensor([False, True, True, False])
    torch.testing.assert_close(guided[inside], everywhere[inside])
    assert torch.equal(guided[~inside], out_cond[~inside])


def test_no_second_forward_outside_the_interval():
    batches = []

    def fake_net(x, t, cond):
        batches.append(x.shape[0])
        return x

    x, _ = inputs(2)
    cond, uncond = text(2, 5, seed=1), text(2, 3, seed=2)
    model_fn = classifier_free_guidance(fake_net, cond, uncond, 2.0, interval=[0.5, 0.8])
    model_fn(x, torch.full((2,), 0.9))  # above: conditional only
    model_fn(x, torch.full((2,), 0.7))  # inside: one batched forward
    model_fn(x, torch.full((2,), 0.1))  # below
    assert batches == [2, 4, 2]


@pytest.mark.parametrize("interval", [(0.6, 0.5), (-0.1, 0.5), (0.5, 1.5), (0.1, 0.2, 0.3)])
def test_rejects_bad_intervals(interval):
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(lambda x, t, c: x, text(1, 2, seed=0), text(1, 2, seed=0), 2.0, interval=interval)
