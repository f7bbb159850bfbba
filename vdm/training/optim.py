"""Optimizer and learning-rate schedule from typed settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class AdamW:
    """AdamW with linear warmup to `lr`, then constant."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (got {self.betas})")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must be >= 0")

    def build(self, parameters: Iterable[torch.nn.Parameter]):
        optimizer = torch.optim.AdamW(
            parameters, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )
        warmup = max(self.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return optimizer, scheduler
