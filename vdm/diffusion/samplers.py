"""Stateless samplers, from t = 1 (noise) to t = 0 (data). See vdm/diffusion/preconditioning.py for
the path x_t = alpha(t) x0 + sigma(t) noise that every objective shares.

All share one signature, sampler(fn, noise, steps, *, shift, generator): the time grid comes from
(steps, shift), x is carried in float32 and returned in noise's dtype, and nothing is kept between calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vdm.diffusion.shift import shift_time

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # velocity_fn(x (B, ...), t (B,)) -> dx/dt (B, ...)
DenoiseFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x, t (B,)) -> (x0_hat, noise_hat), like x
ScalingsFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # t (K,) -> (alpha (K,), sigma (K,))


def check_sampler(name: str, objective) -> str:
    """`name` if it is one of objective.samplers, else a ValueError that lists them."""
    if name not in objective.samplers:
        raise ValueError(
            f"sampler {name!r} does not apply to {type(objective).__name__}: "
            f"valid samplers are {', '.join(objective.samplers)}"
        )
    return name


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """(steps + 1,) float32 times from exactly 1 down to exactly 0.

    shift > 1 spends more steps at high noise, t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024,
    SD3, Eq. 23, with shift = sqrt(m / n)); larger images and longer clips need it. Starting at t = 1
    exactly is the "trailing" spacing of Lin et al. 2023 (Sec. 3.3): sampling starts from pure noise.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive int (steps={steps!r})")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (shift={shift!r})")
    t = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
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
    """Euler integration of dx/dt = velocity_fn(x, t) from x(1) = noise to x(0), in `steps` evaluations.

    `generator` is unused (Euler is deterministic); it is accepted so that all samplers share one signature.
    """
    del generator
    ts = time_grid(steps, shift, device=noise.device)
    x = noise.float()
    batch = x.shape[0]
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        v = velocity_fn(x, t.expand(batch))
        x = x + (t_next - t) * v.float()  # t_next < t: a step toward the data
    return x.to(noise.dtype)


@torch.no_grad()
def sample_heun(
    velocity_fn: VelocityFn,
    noise: Tensor,
    steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, deterministic) on dx/dt = velocity_fn(x, t).

    Each step averages the slope at both ends of an Euler step; the last step, to t = 0, stays an
    Euler step as in Algorithm 1: 2 steps - 1 evaluations. Error falls as steps^-2 (Euler: steps^-1).
    """
    del generator
    ts = time_grid(steps, shift, device=noise.device)
    x = noise.float()
    batch = x.shape[0]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, t.expand(batch)).float()
        x_euler = x + (t_next - t) * v
        if i == steps - 1:  # t_next = 0
            x = x_euler
        else:
            v_next = velocity_fn(x_euler, t_next.expand(batch)).float()
            x = x + (t_next - t) * (v + v_next) / 2
    return x.to(noise.dtype)


@torch.no_grad()
def sample_ddim(
    denoise_fn: DenoiseFn,
    noise: Tensor,
    steps: int,
    *,
    scalings: ScalingsFn,
    shift: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) from x(1) = noise, in `steps` evaluations.

    Each step re-noises the predicted data to the next time with the predicted noise,
        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) noise_hat + c z,   z ~ N(0, I) from `generator`,
    c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2): eta = 0 is the deterministic
    DDIM sampler; eta = 1 draws from the posterior q(x_s | x_t, x0_hat), ancestral DDPM sampling
    (Ho et al. 2020, Algorithm 2, with the posterior variance; Song et al. 2021, Sec. 4.1).
    `scalings(t)` gives the path's (alpha, sigma).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (eta={eta!r})")
    ts = time_grid(steps, shift, device=noise.device)
    alphas, sigmas = (s.float() for s in scalings(ts))  # (S + 1,) each
    x = noise.float()
    batch = x.shape[0]
    for i in range(steps):
        x0_hat, noise_hat = denoise_fn(x, ts[i].expand(batch))
        alpha_t, sigma_t, alpha_s, sigma_s = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        c = eta * sigma_s * (1 - (alpha_t * sigma_s / (alpha_s * sigma_t)).square()).clamp(min=0).sqrt()
        x = alpha_s * x0_hat.float() + (sigma_s.square() - c.square()).clamp(min=0).sqrt() * noise_hat.float()
        if eta > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device)
    return x.to(noise.dtype)
