"""vdm.models.flops: the analytic count is what torch's FLOP counter measures on real networks."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vdm.models import SpaceTimeDiT
from vdm.models.flops import forward_flops, tokens_per_clip, train_flops_per_clip
from vdm.types import TextCond

# (network, latent clip (C, T, H, W), text tokens L): temporal or not, patches of 1 to 4, a one-frame image
SHAPES = [
    (dict(in_channels=3, text_dim=16, width=32, depth=2, heads=2, patch_size=[1, 2, 2]), (3, 4, 8, 8), 5),
    (
        dict(in_channels=4, text_dim=24, width=64, depth=3, heads=4, patch_size=[2, 4, 4], temporal=False),
        (4, 4, 16, 8),
        7,
    ),
    (
        dict(in_channels=3, text_dim=16, width=48, depth=1, heads=3, patch_size=[1, 1, 1], mlp_ratio=2.0),
        (3, 1, 6, 10),
        3,
    ),
]
B = 2


def measure(net: SpaceTimeDiT, clip: tuple, text_tokens: int, backward: bool) -> float:
    """FLOPs per clip as torch.utils.flop_counter counts them: a forward, or a forward and its backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, *clip, generator=g)
    cond = TextCond(
        torch.randn(B, text_tokens, net.text_dim, generator=g),
        torch.ones(B, text_tokens, dtype=torch.bool),
        torch.randn(B, net.text_dim, generator=g),
    )
    # the math backend spells attention as matmuls, which the counter sees (it has no formula for the
    # fused CPU kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(backward):
        out = net(x, torch.rand(B, generator=g), cond)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops() / B


@pytest.mark.parametrize("kwargs, clip, text_tokens", SHAPES)
def test_counts_agree_with_torchs_flop_counter(kwargs, clip, text_tokens):
    torch.manual_seed(0)
    net = SpaceTimeDiT(**kwargs).train()
    _, T, H, W = clip
    forward = forward_flops(net, T, H, W, text_tokens)
    assert forward == pytest.approx(measure(net, clip, text_tokens, backward=False), rel=0.01)

    # 3 forwards is the usual rule; the measured backward skips the input gradients of the first layers
    # (patch embedding, timestep and caption MLPs): a little under 2% less here
    train = train_flops_per_clip(net, T, H, W, text_tokens)
    measured_train = measure(net, clip, text_tokens, backward=True)
    assert train == 3 * forward
    assert train == pytest.approx(measured_train, rel=0.03)

    net.set_grad_checkpointing(True)  # the blocks' forward runs a second time, in the backward
    recomputing = train_flops_per_clip(net, T, H, W, text_tokens)
    measured_recomputing = measure(net, clip, text_tokens, backward=True)
    assert recomputing - train == pytest.approx(measured_recomputing - measured_train, rel=0.01)
    assert recomputing == pytest.approx(measured_recomputing, rel=0.03)
    assert train_flops_per_clip(net, T, H, W, text_tokens, recompute=False) == train


def test_the_count_reads_the_configuration_not_the_parameters():
    # a sharded (FSDP2, ZeRO-3) or meta-device network has the same count as a whole one
    kwargs, (_, T, H, W), text_tokens = SHAPES[0]
    whole = SpaceTimeDiT(**kwargs)
    with torch.device("meta"):
        meta = SpaceTimeDiT(**kwargs)
    assert forward_flops(meta, T, H, W, text_tokens) == forward_flops(whole, T, H, W, text_tokens)


def test_tokens_and_how_the_count_scales():
    net = SpaceTimeDiT(in_channels=3, text_dim=16, width=32, depth=2, heads=2, patch_size=[2, 4, 4])
    assert tokens_per_clip(net, 8, 32, 16) == 4 * 8 * 4
    # every term grows with the tokens or the caption: twice the frames at least doubles the count
    assert forward_flops(net, 8, 32, 32, 7) > 2 * forward_flops(net, 4, 32, 32, 7)
    assert forward_flops(net, 4, 32, 32, 9) > forward_flops(net, 4, 32, 32, 7)
    deeper = SpaceTimeDiT(in_channels=3, text_dim=16, width=32, depth=4, heads=2, patch_size=[2, 4, 4])
    assert forward_flops(deeper, 4, 32, 32, 7) > forward_flops(net, 4, 32, 32, 7)
    with pytest.raises(ValueError, match="not divisible"):
        forward_flops(net, 3, 32, 32, 7)
