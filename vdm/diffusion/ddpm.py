"""Denoising diffusion (Ho et al. 2020) on the variance-preserving path, with epsilon or v prediction.

    x_t = alpha(t) x0 + sigma(t) noise,   alpha = sqrt(alpha_bar(t)),  sigma = sqrt(1 - alpha_bar(t)),

with alpha_bar from a linear or cosine schedule (vdm/diffusion/schedules.py), optionally rescaled to
zero terminal SNR (Lin et al. 2023). The network is called with vdm's continuous time, t = n / N for
the discrete step n, so the same network trains here and under rectified flow; what its output means
is read by vdm/diffusion/preconditioning.py.

Shape legend (see vdm/types.py): B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vdm.diffusion.preconditioning import denoise, min_snr_weight, per_sample, target
from vdm.diffusion.samplers import check_sampler, sample_ddim
from vdm.diffusion.schedules import alpha_bar_at, make_schedule
from vdm.types import TextCond

Net = Callable[[Tensor, Tensor, TextCond], Tensor]  # net(x (B,C,T,H,W), t (B,), cond) -> (B,C,T,H,W)
ModelFn = Callable[[Tensor, Tensor], Tensor]  # model_fn(x (B,C,T,H,W), t (B,)) -> net's output, guided


class DDPM:
    """objective(net, x0, cond, generator) -> (B,) mean squared error of the epsilon or v prediction.

    prediction: "epsilon" (Ho et al. 2020) or "v" (Salimans & Ho 2022). schedule: "linear" or "cosine".
    zero_terminal_snr: alpha_bar = 0 at t = 1 (Lin et al. 2023); needs v prediction, since epsilon
    says nothing about x0 where x_t is pure noise. min_snr_gamma: Min-SNR-gamma loss weights (Hang
    et al. 2023; they use 5), None for none.
    """

    samplers = ("ddim", "ddpm")  # DDIM (Song et al. 2021) and ancestral sampling (Ho et al. 2020)

    def __init__(
        self,
        prediction: str = "epsilon",
        schedule: str = "linear",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        min_snr_gamma: float | None = None,
    ):
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be epsilon or v (prediction={prediction!r})")
        if zero_terminal_snr and prediction == "epsilon":
            raise ValueError(
                "zero_terminal_snr needs prediction=v: at zero SNR x_t is pure noise, so predicting it "
                "tells nothing about x0 (Lin et al. 2023, Sec. 3.2)"
            )
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None (min_snr_gamma={min_snr_gamma!r})")
        self.prediction = prediction
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self.alpha_bar = make_schedule(schedule, num_timesteps, zero_terminal_snr)  # (N + 1,) float64

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) at t (B,), each (B,) float32: x_t = alpha x0 + sigma noise."""
        alpha_bar = alpha_bar_at(self.alpha_bar, t)
        return alpha_bar.sqrt().float(), (1 - alpha_bar).sqrt().float()

    def draw(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t (B,) float32, noise like x0), in this order; t = n / N, n uniform in 1 .. N (Ho et al. 2020, Alg. 1)."""
        n = torch.randint(1, self.num_timesteps + 1, (x0.shape[0],), generator=generator, device=x0.device)
        t = n.float() / self.num_timesteps
        noise = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
        return t, noise

    def __call__(self, net: Net, x0: Tensor, cond: TextCond, generator: torch.Generator) -> Tensor:
        return self.loss_at(net, x0, cond, *self.draw(x0, generator))

    def loss_at(self, net: Net, x0: Tensor, cond: TextCond, t: Tensor, noise: Tensor) -> Tensor:
        """The loss at given t (B,) and noise (like x0): (B,) float32. Any t in [0, 1], on the grid or not."""
        alpha, sigma = self.scalings(t)
        x_t = per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * noise
        pred = net(x_t, t, cond)
        error = pred.float() - target(self.prediction, x0.float(), noise.float(), alpha, sigma)
        loss = error.square().mean(dim=tuple(range(1, x0.ndim)))
        if self.min_snr_gamma is not None:
            loss = loss * min_snr_weight(self.prediction, alpha, sigma, self.min_snr_gamma)
        return loss

    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        *,
        steps: int,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        shift: float | None = None,
    ) -> Tensor:
        """x0 like noise, from t = 1 to 0 on `steps` evenly spaced times (shifted by `shift`, default none).

        sampler: "ddim" (default, deterministic) or "ddpm" (ancestral: fresh noise from `generator` each step).
        """
        eta = {"ddim": 0.0, "ddpm": 1.0}[check_sampler(sampler or "ddim", self)]

        def denoise_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            return denoise(self.prediction, model_fn(x, t).float(), x, *self.scalings(t))

        return sample_ddim(
            denoise_fn,
            noise,
            steps,
            scalings=self.scalings,
            shift=1.0 if shift is None else shift,
            eta=eta,
            generator=generator,
        )

    def __repr__(self) -> str:
        return (
            f"DDPM(prediction={self.prediction!r}, schedule={self.schedule!r}, num_timesteps={self.num_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr}, min_snr_gamma={self.min_snr_gamma})"
        )
