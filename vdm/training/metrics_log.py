"""metrics.csv: one row per logged step, and the same numbers to the experiment loggers."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L


class MetricsLog(L.Callback):
    """metrics.csv, one row per logged step, and the same numbers to the experiment loggers.

    Values logged at the same step (training metrics, held-out loss) are merged into one row, written
    when the next step is logged, at each checkpoint and at the end.
    """

    COLUMNS = (  # the columns added later come last, so older files keep the positions of theirs
        *("step", "train/loss", "val/loss", "lr", "grad_norm", "clips_per_sec", "data_wait"),
        *("tokens_per_sec", "mfu", "peak_gpu_mem_gb"),
        *("train/loss_t0", "train/loss_t1", "train/loss_t2", "train/loss_t3"),
        *("nonfinite_steps",),
        *("eval/digit_acc", "eval/motion_acc"),
        *("eval/consistency",),
    )

    def __init__(self, path: Path):
        self.path = path
        self.pending_step: int | None = None
        self.pending: dict[str, float] = {}
        self.callbacks_done_at: float | None = None  # when the last step's callbacks finished (it runs last)

    def write(self, trainer: L.Trainer, step: int, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        if step != self.pending_step:
            self.flush()
            self.pending_step = step
        self.pending |= metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def flush(self) -> None:
        if self.pending_step is None:
            return
        new_file = not self.path.exists()
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({"step": self.pending_step} | {k: f"{v:.6g}" for k, v in self.pending.items()})
        self.pending_step, self.pending = None, {}

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a run resumed from that step logs them again."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as file:
            rows = list(csv.DictReader(file))
        with open(self.path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(row for row in rows if int(row["step"]) <= step)

    def on_train_start(self, trainer, pl_module) -> None:
        self.callbacks_done_at = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.callbacks_done_at = time.perf_counter()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            self.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.flush()
