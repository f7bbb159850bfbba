"""Lightning's view of VideoData: one training stream per rank, whose position travels in checkpoints."""

from __future__ import annotations

import lightning as L
import torch.distributed as dist

from vdm.data import StreamTracker, VideoData


class VideoDataModule(L.LightningDataModule):
    """Training batches, and where each rank's stream stands after the batches trained on.

    `tracker` is updated with every trained batch (by StreamPosition); a checkpoint stores every rank's
    position, and a resumed run continues each rank's stream exactly there.
    """

    def __init__(self, data: VideoData, seed: int):
        super().__init__()
        self.data, self.seed = data, seed
        self.tracker = StreamTracker()
        self.restored: dict | None = None  # every rank's position, from a checkpoint

    def train_dataloader(self):
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        resume = None
        if self.restored is not None:
            if self.restored["world_size"] != world_size:
                raise ValueError(
                    f"the checkpoint's data position is for {self.restored['world_size']} processes, "
                    f"this run has {world_size}: resuming on a changed world size is not supported yet"
                )
            resume = self.restored["ranks"][rank]
            self.tracker = StreamTracker(resume)
        return self.data.train_loader(self.seed, rank=rank, world_size=world_size, resume=resume)

    def state_dict(self) -> dict:
        # called on every rank when a checkpoint is written; rank 0's copy is the one saved
        state = self.tracker.state()
        ranks = [None] * dist.get_world_size() if dist.is_available() and dist.is_initialized() else [state]
        if len(ranks) > 1:
            dist.all_gather_object(ranks, state)
        return {"seed": self.seed, "world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"the checkpoint's data stream has seed {state.get('seed')}, this run {self.seed}")
        self.restored = state
