"""A real SpaceTimeDiT that goes bad on purpose, for fault-injection runs of train.py.

Selected with `model._target_=tests.training.faulty_dit.FaultyDiT` plus `+model.nan_output_at=[...]`
etc. Training forwards are counted per process (one per micro-batch: call n is step n without
gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from vdm.models.dit import SpaceTimeDiT
from vdm.types import TextCond


class FaultyDiT(SpaceTimeDiT):
    def __init__(
        self,
        *,
        nan_output_at: list[int] | None = None,  # training forwards whose output is NaN
        nan_rank: int = 0,  # ... on this rank only
        nan_weights_at: int = 0,  # > 0: after this step's optimizer step, one weight is NaN (on nan_rank)
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.nan_output_at = set(nan_output_at or [])
        self.nan_rank, self.nan_weights_at = nan_rank, nan_weights_at
        self.training_calls = 0

    def forward(self, x: Tensor, t: Tensor, cond: TextCond) -> Tensor:
        out = super().forward(x, t, cond)
        if not self.training:
            return out
        self.training_calls += 1
        if _rank() != self.nan_rank:
            return out
        if self.training_calls in self.nan_output_at:
            out = out * float("nan")
        if self.training_calls == self.nan_weights_at:
            self.spoil_weights_after_the_optimizer_step()
        return out

    def spoil_weights_after_the_optimizer_step(self) -> None:
        # not here in the forward: autograd still needs the weights as they are
        def spoil(optimizer, args, kwargs):
            with torch.no_grad():
                next(self.parameters()).view(-1)[0] = float("nan")
            handle.remove()

        handle = register_optimizer_step_post_hook(spoil)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
