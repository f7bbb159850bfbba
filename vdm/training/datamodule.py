"""Lightning's view of VideoData: one training stream per rank."""

from __future__ import annotations

import lightning as L

from vdm.data import VideoData


class VideoDataModule(L.LightningDataModule):
    def __init__(self, data: VideoData, seed: int):
        super().__init__()
        self.data, self.seed = data, seed

    def train_dataloader(self):
        return self.data.train_loader(self.seed, rank=self.trainer.global_rank, world_size=self.trainer.world_size)
