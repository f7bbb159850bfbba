"""Rectified flow (Liu et al. 2022, "Flow Straight and Fast"), with the logit-normal time sampling of
Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3, Sec. 3.1).

Convention: t = 0 is data, t = 1 is noise.
    x_t = (1 - t) x0 + t noise,    v = dx_t/dt = noise - x0,
and the network regresses v. Sampling integrates dx/dt = v from t = 1 down to t = 0.

Shape legend (see vdm/types.py): B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vdm.types import TextCond

Net = Callable[[Tensor, Tensor, TextCond], Tensor]  # net(x (B,C,T,H,W), t (B,), cond) -> (B,C,T,H,W)


def sample_logit_normal(
    batch: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """t = sigmoid(u), u ~ N(mean, std^2): (B,) float32 in (0, 1) (SD3 Sec. 3.1, logit-normal sampling).

    Puts more training weight on the middle times, where the velocity is hardest to predict.
    """
    if device is None and generator is not None:
        device = generator.device
    u = torch.randn(batch, generator=generator, device=device) * std + mean
    return torch.sigmoid(u)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    # (B,) -> (B, 1, 1, ...) broadcastable against `like`, in its dtype
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise, with t (B,)."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = dx_t/dt = noise - x0, the same for every t on the straight path."""
    return noise - x0


class RectifiedFlow:
    """objective(net, x0, cond, generator) -> (B,) mean squared velocity error per sample."""

    def __init__(self, logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0):
        if not logit_normal_std > 0:
            raise ValueError(f"logit_normal_std must be > 0 (logit_normal_std={logit_normal_std!r})")
        self.logit_normal_mean = float(logit_normal_mean)
        self.logit_normal_std = float(logit_normal_std)

    def __call__(self, net: Net, x0: Tensor, cond: TextCond, generator: torch.Generator) -> Tensor:
        # Draw order is part of the contract (exact resume): first t (B,), then noise like x0.
        t = sample_logit_normal(
            x0.shape[0], self.logit_normal_mean, self.logit_normal_std, generator=generator, device=x0.device
        )
        # float32 draws, so the same seed gives the same noise whatever dtype x0 is in
        noise = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
        return self.loss_at(net, x0, cond, t, noise)

    def loss_at(self, net: Net, x0: Tensor, cond: TextCond, t: Tensor, noise: Tensor) -> Tensor:
        """The loss at given t (B,) and noise (like x0): (B,) float32. For evaluation at fixed points."""
        pred = net(interpolate(x0, noise, t), t, cond)
        error = pred.float() - velocity_target(x0, noise).float()  # float32 even under bf16 autocast
        return error.square().mean(dim=tuple(range(1, x0.ndim)))

    def __repr__(self) -> str:
        return f"RectifiedFlow(logit_normal_mean={self.logit_normal_mean}, logit_normal_std={self.logit_normal_std})"
