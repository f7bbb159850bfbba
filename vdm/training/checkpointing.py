"""Periodic, final and preemption checkpoints, written atomically and pruned to what the run keeps."""

from __future__ import annotations

import os
import shutil

import lightning as L
import torch

from vdm.training.checkpoint_io import checkpoint_state, fsync_directory
from vdm.training.nonfinite import check_finite_weights
from vdm.training.run_dir import RunDir
from vdm.training.steps import StepBoundary


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, ...); the previous complete one is untouched."""


class Checkpointing(L.Callback):
    """Save every `every_n_steps` and at the end, atomically; keep the newest `keep_last` and every `keep_every`-th.

    Each checkpoint is written to `<name>.partial` and renamed to its final name only once every rank
    has finished writing, so a crash mid-save never leaves a checkpoint that looks complete.
    """

    def __init__(self, run_dir: RunDir, every_n_steps: int, keep_last: int = 2, keep_every: int = 0):
        self.run_dir, self.every_n_steps, self.keep_last, self.keep_every = (
            run_dir,
            every_n_steps,
            keep_last,
            keep_every,
        )
        self.last_saved_step = -1
        self.boundary = StepBoundary()

    def on_train_start(self, trainer, pl_module) -> None:
        self.boundary.start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        crossed = self.boundary.crossed(trainer)  # never in the middle of a gradient accumulation
        if crossed and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self.last_saved_step:
            return
        check_finite_weights(trainer, trainer.lightning_module, step)
        final = self.run_dir.checkpoint_path(step)
        partial = final.with_name(final.name + ".partial")
        # Trainer.save_checkpoint with the write guarded: a rank whose write fails must still meet the others at
        # the barrier they wait in (the checkpoint state is collected from every rank; under DDP rank 0 writes)
        checkpoint = checkpoint_state(trainer)
        error = None
        try:
            trainer.strategy.save_checkpoint(checkpoint, partial)
        except OSError as caught:  # a full disk (ENOSPC), a quota (EDQUOT), a file-size limit (EFBIG), ...
            error = caught
        del checkpoint
        trainer.strategy.barrier("Trainer.save_checkpoint")
        # the ranks agree on the outcome, so they stop together rather than some waiting forever for the others
        flag = torch.tensor(float(error is not None), device=trainer.lightning_module.device)
        failed = trainer.strategy.reduce(flag, reduce_op="sum").item() > 0
        if failed:
            if trainer.is_global_zero and partial.exists():
                shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
            previous = self.run_dir.complete_checkpoints()
            raise CheckpointWriteError(
                f"the checkpoint of step {step} could not be written"
                + (f" ({error})" if error is not None else " (on another rank)")
                + "; "
                + (
                    f"{previous[-1][1]} is intact and the same command resumes from it"
                    if previous
                    else "there is no earlier checkpoint"
                )
            ) from error
        trainer.strategy.barrier("checkpoint-written")
        if trainer.is_global_zero:
            os.replace(partial, final)
            fsync_directory(final.parent)
            for old_step, old in self.run_dir.complete_checkpoints()[: -self.keep_last]:
                if self.keep_every and old_step % self.keep_every == 0:
                    continue  # a milestone: kept for good
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        trainer.strategy.barrier("checkpoint-renamed")
        self.last_saved_step = step
