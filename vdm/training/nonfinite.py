"""Non-finite losses and gradients: skipped steps are counted and recorded; too many in a row stop the run.

The skip itself happens in the module (VideoDiffusion.configure_gradient_clipping; DeepSpeed skips by
itself): every rank skips the same step, so the replicas stay equal. This callback does the
bookkeeping, after the step, on every rank together:

- each skipped step is appended to runs/<name>/nonfinite.jsonl with every rank's sample keys and
  whether that rank's own loss was finite (the rank whose batch went bad is the one with false);
- the running count is logged as `nonfinite_steps` and kept in checkpoints;
- `patience` skipped steps in a row raise NonFiniteTraining: the weights stay those of the last good
  step and the run stops with its own message and exit status (train.py).

A checkpoint is never written with non-finite weights: see `check_finite_weights`.
"""

from __future__ import annotations

import json
import logging

import lightning as L
import torch
import torch.distributed as dist

from vdm.distributed.parallel import local_part
from vdm.training.run_dir import RunDir

log = logging.getLogger(__name__)


class NonFiniteTraining(RuntimeError):
    """The run cannot go on: non-finite losses or gradients kept coming, or the weights themselves went bad."""


class NonFiniteGuard(L.Callback):
    """Counts, records and limits the skipped steps.

    Where the module decides the skip on the device (the step's `applied` a tensor: fused AdamW), the guard reads
    the steps' outcomes only every `trainer.log_every_n_steps` steps, at the last step and before a checkpoint,
    all of them in one read, so that the steps between never wait on the host. The records and counts are
    the same; a run that must stop stops at the next read (the skipped steps in between leave the weights
    as they were).
    """

    def __init__(self, run_dir: RunDir, metrics_log, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be >= 1 (got {patience})")
        self.run_dir, self.metrics_log, self.patience = run_dir, metrics_log, patience
        self.total, self.in_row = 0, 0
        self.last_step = -1
        self.pending: list[tuple[int, object, object, list[str]]] = []  # (step, applied, losses finite, keys)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, outputs = trainer.global_step, outputs["step"]  # vdm.training.module.StepOutputs
        if step == self.last_step or not outputs.finished:  # mid accumulation: no optimizer step yet
            return
        self.last_step = step
        applied = outputs.applied
        self.pending.append((step, applied, outputs.losses_finite, list(outputs.keys)))
        if not torch.is_tensor(applied) or step % trainer.log_every_n_steps == 0 or step >= trainer.max_steps:
            self.read(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.read(trainer)

    def read(self, trainer) -> None:
        """Go through the pending steps' outcomes (one host read for all of them), in order."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        as_float = [torch.as_tensor(x, dtype=torch.float32).reshape(()) for _, a, f, _ in pending for x in (a, f)]
        flags = torch.stack([x.to(as_float[0].device) for x in as_float]).tolist()  # applied, finite, ...
        skipped = False
        for index, (step, _, _, keys) in enumerate(pending):
            applied, finite = bool(flags[2 * index]), bool(flags[2 * index + 1])
            if applied:
                self.in_row = 0
                continue
            skipped = True
            self.record_skip(trainer, step, finite, keys)
            if self.in_row >= self.patience:
                if trainer.is_global_zero:
                    self.metrics_log.write(trainer, trainer.global_step, {"nonfinite_steps": float(self.total)})
                raise NonFiniteTraining(
                    f"stopped at step {step}: {self.in_row} optimizer steps in a row had a non-finite loss or "
                    f"gradient (limit trainer.max_nonfinite_steps_in_row={self.patience}); the weights are those "
                    f"of step {step - self.in_row}; the skipped batches are listed in "
                    f"{self.run_dir.path / 'nonfinite.jsonl'}"
                )
        if skipped:
            self.metrics_log.write(trainer, trainer.global_step, {"nonfinite_steps": float(self.total)})

    def record_skip(self, trainer, step: int, loss_finite: bool, keys: list[str]) -> None:
        self.total += 1
        self.in_row += 1
        record = {
            "step": step,
            "ranks": _gather({"rank": trainer.global_rank, "loss_finite": loss_finite, "keys": keys}),
        }
        if trainer.is_global_zero:
            with open(self.run_dir.path / "nonfinite.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")
            bad = [r for r in record["ranks"] if not r["loss_finite"]]
            log.warning(
                "step %d skipped: non-finite %s (%d in a row, %d in all); %s",
                step,
                "loss" if bad else "gradients",
                self.in_row,
                self.total,
                "; ".join(f"rank {r['rank']} keys {r['keys']}" for r in (bad or record["ranks"])),
            )

    def state_dict(self) -> dict:
        # a checkpoint (every rank writes its part together) holds the counts of every step before it
        trainer = getattr(self, "trainer", None)
        if self.pending and trainer is not None:
            self.read(trainer)
        return {"total": self.total, "in_row": self.in_row}

    def setup(self, trainer, pl_module, stage) -> None:
        self.trainer = trainer

    def load_state_dict(self, state_dict: dict) -> None:
        self.total, self.in_row = int(state_dict["total"]), int(state_dict["in_row"])


def _gather(item: dict) -> list[dict]:
    """`item` from every rank, in rank order (only on skipped steps: rare, so an object collective is fine)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [item]
    items: list = [None] * dist.get_world_size()
    dist.all_gather_object(items, item)
    return items


def count_nonfinite(tensors) -> int:
    """Non-finite elements in this rank's part of `tensors` (ZeRO-3 partitions, DTensor shards, plain tensors)."""
    return sum(int((~torch.isfinite(local_part(tensor).detach())).sum()) for tensor in tensors)


def check_finite_weights(trainer: L.Trainer, pl_module, step: int) -> None:
    """Raise NonFiniteTraining on every rank if any rank holds a non-finite weight (or EMA weight)."""
    tensors = list(pl_module.net.parameters())
    if pl_module.ema is not None:
        tensors += list(pl_module.ema.weights.values())
    local = torch.tensor(float(count_nonfinite(tensors)), device=pl_module.device)
    total = int(trainer.strategy.reduce(local, reduce_op="sum").item())
    if total:
        raise NonFiniteTraining(
            f"refusing to write the checkpoint of step {step}: {total} weights are not finite; the previous "
            "checkpoint is intact"
        )
