"""Optimizer and learning-rate schedule from typed settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class AdamW:
    """AdamW with linear warmup to `lr`, then constant.

    fused: one kernel per parameter group instead of a few per tensor list (torch's `fused=True`). None picks it
    where the parameters are on a GPU. A fused optimizer also skips a non-finite step on the device (see
    VideoDiffusion.configure_gradient_clipping), so the training step never waits on the host; the unfused one
    makes the host read one number per step. On a CPU fused works too (torch's CPU kernel): same results up to
    rounding, and the step is sync-free there as well, which on a CPU changes nothing.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    fused: bool | None = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (got {self.betas})")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must be >= 0")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise ValueError(f"fused must be true, false or null (got {self.fused!r})")

    def build(self, parameters: Iterable[torch.nn.Parameter]):
        parameters = list(parameters)
        fused = self.fused if self.fused is not None else bool(parameters) and parameters[0].device.type == "cuda"
        optimizer = torch.optim.AdamW(
            parameters, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, fused=fused
        )
        warmup = max(self.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return optimizer, scheduler
