"""One network trains and samples under every objective: only the objective changes, never the network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vdm.diffusion import DDPM, RectifiedFlow
from vdm.types import TextCond

B, C, T, H, W = 4, 2, 2, 4, 4

OBJECTIVES = [
    RectifiedFlow(),
    RectifiedFlow(shift=3.0, min_snr_gamma=5.0),
    RectifiedFlow(shift_reference=(1, 4, 4)),
    DDPM("epsilon", "linear"),
    DDPM("epsilon", "cosine", min_snr_gamma=5.0),
    DDPM("v", "linear"),
    DDPM("v", "cosine", zero_terminal_snr=True),
    DDPM("v", "cosine", zero_terminal_snr=True, min_snr_gamma=5.0),
]


class TinyNet(nn.Module):
    """A per-pixel MLP on (x, t, pooled text): the same module whatever it is asked to predict."""

    def __init__(self, channels: int = C, text_dim: int = 8, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(channels + 1 + text_dim, width)
        self.out = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        b, c, f, h, w = x.shape
        pixels = x.permute(0, 2, 3, 4, 1)  # (B, T, H, W, C)
        extra = torch.cat([t.reshape(b, 1).to(x.dtype), cond.pooled.to(x.dtype)], dim=1)  # (B, 1 + D)
        features = torch.cat([pixels, extra.reshape(b, 1, 1, 1, -1).expand(b, f, h, w, -1)], dim=-1)
        return self.out(torch.tanh(self.inp(features))).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)


def text(batch: int = B) -> TextCond:
    pooled = torch.randn(batch, 8, generator=torch.Generator().manual_seed(9))
    return TextCond(torch.zeros(batch, 3, 8), torch.ones(batch, 3, dtype=torch.bool), pooled)


def data(batch: int = B) -> torch.Tensor:
    return 0.5 + 0.3 * torch.randn(batch, C, T, H, W, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
def test_loss_shape_finite_and_gradients_reach_every_parameter(objective):
    torch.manual_seed(0)
    net = TinyNet()
    loss = objective(net, data(), text(), torch.Generator().manual_seed(1))
    assert loss.shape == (B,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
def test_training_lowers_the_loss_at_fixed_points(objective):
    # the held-out loss of HeldOutLoss: fixed t over (0, 1) and fixed noise
    torch.manual_seed(0)
    net = TinyNet()
    x0, cond = data(16), text(16)
    t = (torch.arange(16) + 0.5) / 16
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    held_out = lambda: objective.loss_at(net, x0, cond, t, noise).mean().item()
    before = held_out()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(40):
        optimizer.zero_grad()
        objective(net, x0, cond, torch.Generator().manual_seed(100 + step)).mean().backward()
        optimizer.step()
    assert held_out() < 0.8 * before


@pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
def test_every_sampler_returns_a_finite_sample_like_the_noise(objective):
    torch.manual_seed(0)
    net = TinyNet()
    noise = torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(3)).bfloat16()
    model_fn = lambda x, t: net(x, t, text())
    for sampler in objective.samplers:
        x0 = objective.sample(model_fn, noise, steps=4, sampler=sampler, generator=torch.Generator().manual_seed(4))
        assert x0.shape == noise.shape and x0.dtype == noise.dtype and torch.isfinite(x0).all()
