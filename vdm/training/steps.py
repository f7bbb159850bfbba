"""Optimizer-step boundaries as the callbacks see them.

`on_train_batch_end` runs after every micro-batch; with `trainer.accumulate_grad_batches > 1` most of them end
in the middle of an accumulation, where a checkpoint would lose the gradients gathered so far and an evaluation
would repeat the one of the step before. The step count advances exactly when an optimizer step was taken, so a
callback acts at step N only on the micro-batch whose step advanced the count to N.
"""

from __future__ import annotations


class StepBoundary:
    """`crossed(trainer)` is True on the first call after the optimizer step count advanced, else False."""

    def __init__(self):
        self.step: int | None = None  # the step count at the last call

    def start(self, trainer) -> None:
        """Call from on_train_start: a resumed run starts at its checkpoint's step, not at 0."""
        self.step = trainer.global_step

    def crossed(self, trainer) -> bool:
        previous, self.step = self.step, trainer.global_step
        if previous is None:  # start() was not called: a step was taken if the count is past 0
            return trainer.global_step > 0
        return trainer.global_step != previous
