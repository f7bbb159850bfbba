"""Checkpoint files written straight into place and flushed to disk: no in-memory copy, no detour through /tmp.

Also the one place that uses Lightning's private API for checkpoints (`checkpoint_state`); its test
(tests/training/test_checkpoint_io.py) fails first if a Lightning release changes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class DirectCheckpointIO(TorchCheckpointIO):
    """Saves a single-file checkpoint (single process, DDP) with torch.save into the file itself, then fsyncs it.

    Lightning's default serializes the whole checkpoint into memory first, then writes it through an fsspec
    transaction that stages it in the system temp folder and moves it over: twice the checkpoint in host
    memory, and a full extra copy through /tmp (often a small tmpfs on cluster nodes). Atomicity comes from
    vdm.training.checkpointing.Checkpointing instead: it passes `<name>.partial` here and renames it only
    when every rank is done, so writing in place is safe. Loading is Lightning's (memory-mapped torch.load).
    DeepSpeed and FSDP2 write their sharded directories themselves and never come here.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # on disk before the rename makes it the checkpoint to resume
        except RuntimeError as error:
            # torch's zip writer turns a failed write (full disk, quota, file-size limit) into a RuntimeError
            # ("unexpected pos ..."); the OSError behind it is what the caller handles and the user must see
            written = error.__context__
            if isinstance(written, OSError):
                raise OSError(written.errno, f"{written.strerror}: {path}") from error
            raise


def fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable: a crash after it cannot bring the old name back."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_state(trainer: L.Trainer) -> dict:
    """The checkpoint `Trainer.save_checkpoint` would write (every callback's and the module's state), collected
    on every rank. Trainer.save_checkpoint itself writes and then meets the other ranks at a barrier; vdm guards
    the write in between (vdm.training.checkpointing), which needs the state apart from the write. Lightning has
    no public call for that, so this is the one use of its private checkpoint connector."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
