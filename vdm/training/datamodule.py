"""Lightning's view of VideoData: one training stream per rank, whose position travels in checkpoints."""

from __future__ import annotations

import logging

import lightning as L
import torch.distributed as dist

from vdm.data import StreamTracker, VideoData
from vdm.data.reshard import carry_over, saved_layout

log = logging.getLogger(__name__)


class VideoDataModule(L.LightningDataModule):
    """Training batches, and where each rank's stream stands after the batches trained on.

    `tracker` is updated with every trained batch (by StreamPosition); a checkpoint stores every rank's
    position, and a resumed run continues each rank's stream exactly there. A run resumed with another
    number of processes or loader workers continues the passes begun without repeating or losing a
    sample (vdm.data.reshard), in another order.
    """

    def __init__(self, data: VideoData, seed: int):
        super().__init__()
        self.data, self.seed = data, seed
        self.tracker = StreamTracker()
        self.restored: dict | None = None  # every rank's position, from a checkpoint

    def train_dataloader(self):
        # the data-parallel replicas: the ranks of a sequence-parallel group read the same stream
        rank, world_size = self.data_layout()
        resume = None
        if self.restored is not None:
            num_workers = max(self.data.num_workers, 1)  # 0: batches made in the training process, as one worker
            ranks = self.restored["ranks"]
            resume = carry_over(
                ranks, self.data.train_sources, seed=self.seed, world_size=world_size, num_workers=num_workers
            )[rank]
            if self.trainer.is_global_zero:
                self.report_changes(saved_layout(ranks), (world_size, num_workers))
            self.tracker = StreamTracker(resume)
        return self.data.train_loader(self.seed, rank=rank, world_size=world_size, resume=resume)

    def data_layout(self) -> tuple[int, int]:
        """(data rank, data world size): a rank's stream and the number of streams (VideoDiffusion.data_rank)."""
        module = self.trainer.lightning_module
        return module.data_rank, module.data_world_size

    def report_changes(self, saved: tuple[int, int] | None, now: tuple[int, int]) -> None:
        """Say what a changed layout keeps of the stream, and how the global batch changed with it."""
        if saved is None:  # nothing was trained
            return
        if saved != now:
            log.warning(
                "data stream: the checkpoint was written by %d processes x %d loader workers, this run has %d x %d. "
                "The stream is re-derived for the new layout: in every pass (epoch) begun, no sample already "
                "trained on is yielded again and none not yet trained on is lost (samples that sat in shuffle "
                "buffers or unfinished batches are read again), in an order that differs from an uninterrupted "
                "run; later passes follow the new layout. Only an unchanged layout continues exactly.",
                *saved,
                *now,
            )
        batch_size = self.restored.get("batch_size", self.data.batch_size)
        accumulate = self.restored.get("accumulate_grad_batches", self.trainer.accumulate_grad_batches)
        before = batch_size * accumulate * saved[0]
        after = self.data.batch_size * self.trainer.accumulate_grad_batches * now[0]
        if before != after:
            log.warning(
                "global batch: %d clips per optimizer step before (%d x %d accumulated x %d processes), %d now "
                "(%d x %d x %d). The step count and learning-rate schedule go on unchanged; set "
                "trainer.accumulate_grad_batches or data.batch_size to keep the global batch.",
                before,
                batch_size,
                accumulate,
                saved[0],
                after,
                self.data.batch_size,
                self.trainer.accumulate_grad_batches,
                now[0],
            )

    def state_dict(self) -> dict:
        # called on every rank when a checkpoint is written; rank 0's copy is the one saved
        state = self.tracker.state()
        ranks = [state]  # one process, with or without a process group (DeepSpeed and FSDP2 make one)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state)
            ranks = ranks[:: self.trainer.lightning_module.sequence_parallel_size]  # one per stream
        return {
            "seed": self.seed,
            "world_size": len(ranks),
            "ranks": ranks,
            "batch_size": self.data.batch_size,
            "accumulate_grad_batches": self.trainer.accumulate_grad_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"the checkpoint's data stream has seed {state.get('seed')}, this run {self.seed}")
        self.restored = state


class StreamPosition(L.Callback):
    """Records each trained batch's data-stream position in the data module (saved with checkpoints)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.tracker.update(batch)
