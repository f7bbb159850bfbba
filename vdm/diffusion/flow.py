"""Rectified flow (Liu et al. 2022, "Flow Straight and Fast"), with the logit-normal time sampling of
Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3, Sec. 3.1).

Convention: t = 0 is data, t = 1 is noise.
    x_t = (1 - t) x0 + t noise,    v = dx_t/dt = noise - x0,
and the network regresses v. Sampling integrates dx/dt = v from t = 1 down to t = 0 (Euler or Heun).

Shape legend (see vdm/types.py): B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vdm.diffusion.preconditioning import min_snr_weight, per_sample
from vdm.diffusion.samplers import VelocityFn, check_sampler, sample_euler, sample_heun
from vdm.diffusion.shift import shift_for_shape, shift_time
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


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise, with t (B,)."""
    t = per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = dx_t/dt = noise - x0, the same for every t on the straight path."""
    return noise - x0


class RectifiedFlow:
    """objective(net, x0, cond, generator) -> (B,) mean squared velocity error per sample.

    Training times are logit-normal, then shifted (SD3 Eq. 23, see vdm/diffusion/shift.py) by
    `shift`, or, with `shift_reference` (T, H, W) set, by shift * sqrt(T H W / reference T H W) of
    the latents at hand; sampling's time grid gets the same shift from the noise's shape.
    """

    samplers = ("euler", "heun")

    def __init__(
        self,
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        shift: float = 1.0,
        shift_reference: tuple[int, int, int] | None = None,
        min_snr_gamma: float | None = None,
    ):
        if not logit_normal_std > 0:
            raise ValueError(f"logit_normal_std must be > 0 (logit_normal_std={logit_normal_std!r})")
        if not shift > 0:
            raise ValueError(f"shift must be > 0 (shift={shift!r})")
        if shift_reference is not None and (len(shift_reference) != 3 or not all(n > 0 for n in shift_reference)):
            raise ValueError(
                f"shift_reference must be three positive sizes (T, H, W) (shift_reference={shift_reference!r})"
            )
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None (min_snr_gamma={min_snr_gamma!r})")
        self.logit_normal_mean = float(logit_normal_mean)
        self.logit_normal_std = float(logit_normal_std)
        self.shift = float(shift)
        self.shift_reference = None if shift_reference is None else tuple(int(n) for n in shift_reference)
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)

    def shift_for(self, shape: Sequence[int]) -> float:
        """The time shift for latents of this (B, C, T, H, W) shape."""
        return shift_for_shape(shape, self.shift, self.shift_reference)

    def draw(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t (B,) float32, noise like x0). The order is part of the contract (exact resume): t, then noise."""
        t = sample_logit_normal(
            x0.shape[0], self.logit_normal_mean, self.logit_normal_std, generator=generator, device=x0.device
        )
        t = shift_time(t, self.shift_for(x0.shape))
        # float32 draws, so the same seed gives the same noise whatever dtype x0 is in
        noise = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
        return t, noise

    def __call__(self, net: Net, x0: Tensor, cond: TextCond, generator: torch.Generator) -> Tensor:
        return self.loss_at(net, x0, cond, *self.draw(x0, generator))

    def loss_at(self, net: Net, x0: Tensor, cond: TextCond, t: Tensor, noise: Tensor) -> Tensor:
        """The loss at given t (B,) and noise (like x0): (B,) float32. For evaluation at fixed points."""
        pred = net(interpolate(x0, noise, t), t, cond)
        error = pred.float() - velocity_target(x0, noise).float()  # float32 even under bf16 autocast
        loss = error.square().mean(dim=tuple(range(1, x0.ndim)))
        if self.min_snr_gamma is not None:
            t = t.float()
            loss = loss * min_snr_weight("velocity", 1 - t, t, self.min_snr_gamma)
        return loss

    def sample(
        self,
        model_fn: VelocityFn,
        noise: Tensor,
        *,
        steps: int,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        shift: float | None = None,
    ) -> Tensor:
        """x0 like noise (B, C, T, H, W), integrating the velocity model_fn(x, t) from t = 1 to 0.

        sampler: "euler" (default) or "heun"; shift: None takes this objective's rule for noise's shape.
        """
        sample = {"euler": sample_euler, "heun": sample_heun}[check_sampler(sampler or "euler", self)]
        shift = self.shift_for(noise.shape) if shift is None else shift
        return sample(model_fn, noise, steps, shift=shift, generator=generator)

    def __repr__(self) -> str:
        return (
            f"RectifiedFlow(logit_normal_mean={self.logit_normal_mean}, logit_normal_std={self.logit_normal_std}, "
            f"shift={self.shift}, shift_reference={self.shift_reference}, min_snr_gamma={self.min_snr_gamma})"
        )
