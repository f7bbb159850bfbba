"""Stateless samplers for the rectified-flow ODE dx/dt = v(x, t), integrated from t = 1 (noise) to
t = 0 (data). See vdm/diffusion/flow.py for the convention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # velocity_fn(x (B, ...), t (B,)) -> (B, ...)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """(steps + 1,) float32 times from exactly 1 down to exactly 0.

    shift > 1 spends more steps at high noise, t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024,
    SD3, Eq. 23, with shift = sqrt(m / n)); larger images and longer clips need it.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive int (steps={steps!r})")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (shift={shift!r})")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.to(device=device, dtype=torch.float32)


@torch.no_grad()
def sample_euler(
    velocity_fn: VelocityFn,
    noise: Tensor,
    steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler integration of dx/dt = velocity_fn(x, t) from x(1) = noise to x(0), in `steps` steps.

    x is carried in float32 and returned in noise's dtype. `generator` is unused (Euler is
    deterministic); it is accepted so that all samplers share one signature.
    """
    del generator
    ts = time_grid(steps, shift, device=noise.device)
    x = noise.float()
    batch = x.shape[0]
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        v = velocity_fn(x, t.expand(batch))
        x = x + (t_next - t) * v.float()  # t_next < t: a step toward the data
    return x.to(noise.dtype)
