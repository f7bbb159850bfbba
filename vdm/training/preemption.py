"""Preemption: a signal asks the run to stop; all ranks checkpoint together at the next step and exit.

SLURM sends SIGUSR1 before the time limit (`#SBATCH --signal=USR1@<seconds>`) and SIGTERM on scancel or
preemption. The handler only sets a flag: a checkpoint is never written from inside a signal handler.
At each step boundary the ranks all-reduce their flags (one rank is enough to stop all), write one
checkpoint together, and stop. For SIGUSR1 under SLURM, with steps left, rank 0 first requeues the job,
which then resumes from that checkpoint by itself (resume=auto); after SIGTERM Slurm decides whether the
job runs again (requeueing then would revive a cancelled job).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import lightning as L
import torch

from vdm.training.callbacks import Checkpointing

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    def __init__(self, checkpointing: Checkpointing, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.checkpointing, self.signals = checkpointing, signals
        self.requested: int | None = None  # the signal received on this rank
        self.preempted = False  # this run stopped for a signal (reported in train.py's summary)
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer, pl_module) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.requested != signal.SIGTERM:  # SIGTERM (scancel, preemption) wins over an earlier SIGUSR1
            self.requested = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flags = torch.tensor(
            [float(self.requested is not None), float(self.requested == signal.SIGTERM)], device=pl_module.device
        )
        stop, terminate = trainer.strategy.reduce(flags, reduce_op="sum").tolist()  # over all ranks
        if stop == 0:
            return
        log.warning(
            "step %d: stop requested by signal (%s on this rank); checkpointing on all ranks",
            trainer.global_step,
            signal.Signals(self.requested).name if self.requested else "another rank",
        )
        self.checkpointing.save(trainer)
        # requeue only for SIGUSR1 (the time limit is near) and only if steps are left. SIGTERM is scancel or
        # preemption: Slurm decides whether the job runs again (a requeue here would revive a cancelled job)
        finished = trainer.global_step >= trainer.max_steps
        if trainer.is_global_zero and os.environ.get("SLURM_JOB_ID") and not terminate and not finished:
            job = os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.warning("requeued SLURM job %s: it resumes from step %d", job, trainer.global_step)
            else:
                log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        self.preempted = True
        trainer.should_stop = True
