"""Preemption: a signal asks the run to stop; all ranks checkpoint together at an optimizer-step boundary and exit.

Slurm sends SIGUSR1 before the time limit (`#SBATCH --signal=USR1@<seconds>`) and SIGTERM on scancel, at the time
limit and on preemption, to every process of the job step (vdm.signals keeps the DataLoader workers alive through
them). `StopRequests.listen()`, called first thing in train.py, installs a handler that only records the signal:
a checkpoint is never written from inside a signal handler, and a signal that comes during start-up waits for the
first step. At each optimizer-step boundary (never inside a gradient accumulation) the ranks vote (one rank is
enough to stop all), write one checkpoint together, and stop. For SIGUSR1 under Slurm, with steps left, rank 0
first requeues the job, which then resumes from that checkpoint by itself (resume=auto); after SIGTERM Slurm
decides whether the job runs again (requeueing then would revive a cancelled job).

The vote costs the step nothing: the flags are all-reduced asynchronously over a CPU (gloo) group and read at the
next boundary, so no step waits on a collective or on the device, and every rank reads the same result at the
same step. The run stops one step after the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import lightning as L
import torch
import torch.distributed as dist

from vdm.signals import STOP_SIGNALS
from vdm.training.checkpointing import Checkpointing
from vdm.training.steps import StepBoundary

log = logging.getLogger(__name__)


class StopRequests:
    """The stop signal this process received, if any (SIGTERM wins over an earlier SIGUSR1)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None

    def listen(self) -> None:
        """Install the handler; again from on_train_start, since Lightning puts its own SIGTERM handler in place
        when fit starts (one that broadcasts from inside the handler)."""
        for signum in self.signals:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received != signal.SIGTERM:  # SIGTERM (scancel, preemption) wins over an earlier SIGUSR1
            self.received = signum


class Preemption(L.Callback):
    def __init__(self, checkpointing: Checkpointing, requests: StopRequests):
        self.checkpointing, self.requests = checkpointing, requests
        self.preempted = False  # this run stopped for a signal (reported in train.py's summary)
        self.boundary = StepBoundary()
        self._group = None  # the CPU process group of the vote, with more than one process
        self._pending: tuple[dist.Work, torch.Tensor] | None = None  # the vote launched at the last boundary

    def on_train_start(self, trainer, pl_module) -> None:
        self.requests.listen()
        self.boundary.start(trainer)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")  # every rank, in the same order

    def on_train_end(self, trainer, pl_module) -> None:
        if self._pending is not None:  # every rank launched it: it completes
            self._pending[0].wait()
            self._pending = None

    def vote(self) -> tuple[bool, bool]:
        """(stop, terminate): some rank received a signal / some rank received SIGTERM, as of the last boundary."""
        received = self.requests.received
        stop, terminate = received is not None, received == signal.SIGTERM
        if self._group is None:
            return stop, terminate
        # host tensors over gloo: reading them waits for the other ranks' vote, never for the accelerator
        flags = torch.tensor([float(stop), float(terminate)], dtype=torch.float64)
        result = torch.zeros(2, dtype=torch.float64)
        if self._pending is not None:
            work, result = self._pending
            work.wait()
        self._pending = (dist.all_reduce(flags, group=self._group, async_op=True), flags)
        return bool(result[0] > 0), bool(result[1] > 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.boundary.crossed(trainer):  # inside a gradient accumulation: no checkpoint can be written
            return
        stop, terminate = self.vote()
        if not stop:
            return
        received = self.requests.received
        log.warning(
            "step %d: stop requested by signal (%s on this rank); checkpointing on all ranks",
            trainer.global_step,
            signal.Signals(received).name if received else "another rank",
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
