"""DDPM noise schedules as alpha_bar tables, and alpha_bar at a continuous t.

A table is (N + 1,) float64 over the discrete timesteps n = 0 .. N, with t = n / N: alpha_bar[0] = 1
(t = 0, the data) and alpha_bar[N] at t = 1, the noisiest step. Ho et al. 2020 number the noisy steps
1 .. N; index 0 is added so that the table covers t = 0 too. x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_schedule(num_timesteps: int) -> Tensor:
    """Betas linear from 1e-4 to 0.02 over 1000 steps (Ho et al. 2020, Sec. 4), scaled by 1000 / N for
    other N so that the total noise stays the same (Nichol & Dhariwal 2021, improved-diffusion)."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    return _from_betas(betas)


def cosine_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """alpha_bar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) pi / 2)^2 (Nichol & Dhariwal 2021, Eq. 17),
    with each beta clipped to max_beta: without the clip alpha_bar reaches 0 at t = 1 and epsilon
    prediction breaks down there (their Sec. 3.2)."""
    t = torch.linspace(0, 1, num_timesteps + 1, dtype=torch.float64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2).square()
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    return _from_betas(betas)


def _from_betas(betas: Tensor) -> Tensor:
    # alpha_bar_n = prod_{i <= n} (1 - beta_i) (Ho et al. 2020, Eq. 4); a leading 1 for t = 0
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, dim=0)])


def rescale_zero_terminal_snr(alpha_bar: Tensor) -> Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1.

    Shifts and scales sqrt(alpha_bar) over the noisy steps 1 .. N so that the last is exactly 0 (zero
    SNR: the model learns to start from pure noise, which is what sampling starts from) and the first
    keeps its value. alpha_bar[0] = 1 (t = 0) is left alone.
    """
    root = alpha_bar[1:].sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return torch.cat([alpha_bar[:1], root.square()])


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_schedule(name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> Tensor:
    """The (N + 1,) float64 alpha_bar table of a named schedule."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (schedule={name!r})")
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2 (num_timesteps={num_timesteps!r})")
    alpha_bar = SCHEDULES[name](num_timesteps)
    return rescale_zero_terminal_snr(alpha_bar) if zero_terminal_snr else alpha_bar


def alpha_bar_at(alpha_bar: Tensor, t: Tensor) -> Tensor:
    """alpha_bar at continuous t (B,) in [0, 1]: the table at t = n / N, linear in between. (B,) float64.

    Training draws t on the grid; held-out losses and samplers with steps that do not divide N
    ask between the grid points.
    """
    num_timesteps = alpha_bar.shape[0] - 1
    table = alpha_bar.to(t.device)
    position = t.double().clamp(0, 1) * num_timesteps
    low = position.floor().long().clamp(max=num_timesteps - 1)
    frac = position - low
    return table[low] * (1 - frac) + table[low + 1] * frac
