"""Optimizer and learning-rate schedule from typed settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vdm.models.lora import target_pattern
from vdm.models.param_groups import GROUPS, TRAINABLE, parameter_group


@dataclass
class AdamW:
    """AdamW with linear warmup to `lr`, then constant.

    fused: one kernel per parameter group instead of a few per tensor list (torch's `fused=True`). None picks it
    where the parameters are on a GPU. A fused optimizer also skips a non-finite step on the device (see
    VideoDiffusion.configure_gradient_clipping), so the training step never waits on the host; the unfused one
    makes the host read one number per step. On a CPU fused works too (torch's CPU kernel): same results up to
    rounding, and the step is sync-free there as well, which on a CPU changes nothing.

    Staged fine-tuning (vdm/models/param_groups.py): `trainable` "temporal" freezes all but the temporal layers
    (frozen parameters get no gradient and no optimizer state), "all" trains everything; `lr_scale` multiplies
    `lr` per kind of parameter ({temporal, spatial, embeddings}: e.g. new temporal layers faster than the image
    model's spatial ones). With every scale 1 the parameters form one group, as without it.
    `lora_rank` > 0 adds LoRA adapters (scale lora_alpha / lora_rank) to `lora_targets` (spatial_attn,
    cross_attn, temporal_attn, mlp) and freezes the layers they adapt: the alternative to unfreezing them.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    fused: bool | None = None
    trainable: str = "all"
    lr_scale: dict[str, float] | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("spatial_attn", "mlp")

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
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)} (got {self.trainable!r})")
        scales = dict(self.lr_scale or {})
        unknown = sorted(set(scales) - set(GROUPS))
        if unknown:
            raise ValueError(f"lr_scale: unknown groups {unknown} (the groups are {', '.join(GROUPS)})")
        bad = {k: v for k, v in scales.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0}
        if bad:
            raise ValueError(f"lr_scale: each scale must be a number > 0 (got {bad}; trainable freezes groups)")
        self.lr_scale = {group: float(scales.get(group, 1.0)) for group in GROUPS}
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0 (0: no adapters; got {self.lora_rank!r})")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 or null (= lora_rank; got {self.lora_alpha!r})")
        self.lora_targets = tuple(self.lora_targets)
        target_pattern(list(self.lora_targets))  # refuses an unknown or empty list now, not when adapters are added

    def parameter_groups(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict]:
        """The trainable parameters, in one group, or one per kind with its learning rate when lr_scale says so."""
        named = [(name, p) for name, p in named_parameters if p.requires_grad]
        if all(scale == 1.0 for scale in self.lr_scale.values()):
            return [{"params": [p for _, p in named]}]
        groups = []
        for group in GROUPS:
            params = [p for name, p in named if parameter_group(name) == group]
            if params:
                groups.append({"params": params, "lr": self.lr * self.lr_scale[group], "name": group})
        return groups

    def build(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]):
        """Optimizer and schedule over the trainable parameters of `named_parameters` (net.named_parameters())."""
        groups = self.parameter_groups(named_parameters)
        first = next((p for g in groups for p in g["params"]), None)
        fused = self.fused if self.fused is not None else first is not None and first.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            groups, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, fused=fused
        )
        warmup = max(self.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return optimizer, scheduler
