"""The signals that ask a run to stop, and the child processes that must survive them.

Slurm sends SIGUSR1 before the time limit (`--signal=USR1@N`, `scancel -s USR1`) and SIGTERM on `scancel`, at the
time limit and on preemption, to every process of the job step: not only to the training processes but to their
DataLoader workers too. A worker's default action for both is to terminate, and the training process then dies
with "DataLoader worker (pid ...) is killed by signal" before it can write a checkpoint. Only the training
process acts on them (vdm.training.preemption); the children it starts ignore them and end when it ends (a
worker notices its parent's exit by itself).

A child started with the signals *blocked* cannot die of one sent in the moment between its start and its first
line of Python: `deferred()` blocks them in the parent while it starts children (who inherit the mask), and
`ignore_stop_signals()`, run first thing in the child, ignores them and unblocks. A signal the parent receives
meanwhile waits, and its handler runs as soon as the block ends.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextmanager
def deferred(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Block `signals` in the calling thread for the duration; processes and threads started meanwhile inherit it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(*_) -> None:
    """In a child process (a DataLoader worker_init_fn): the stop signals are the parent's to act on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
