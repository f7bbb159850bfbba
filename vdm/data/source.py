"""VideoData: what a data config describes, and the loaders it builds."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import DataLoader

from vdm.data.pipeline import ClipSampler, VideoShardDataset
from vdm.data.shards import expand_shards
from vdm.data.skips import SkipCounter


@dataclass
class VideoData:
    """Shards and clip shape for training and held-out evaluation.

    Paths are relative to the directory train.py is started from.
    """

    train_shards: str  # brace pattern of local tar / tar.gz shards
    eval_shards: str | None = None  # held-out shards, read in one plain pass
    num_frames: int = 8  # frames per clip
    frame_stride: int = 1  # take every k-th frame of the source
    size: int = 32  # clips are size x size after resize and crop
    batch_size: int = 16  # clips per batch on each process
    num_workers: int = 1  # loader processes per training process
    shuffle_buffer: int = 512  # samples held for shuffling in each worker
    random_crop: bool = True  # train only; evaluation always crops the centre
    eval_clips: int = 256  # held-out clips used for the held-out loss
    skips: SkipCounter = field(default_factory=SkipCounter, init=False, repr=False)

    def __post_init__(self):
        for name in ("num_frames", "frame_stride", "size", "batch_size", "eval_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        self.train_shard_list = expand_shards(self.train_shards)
        self.eval_shard_list = expand_shards(self.eval_shards) if self.eval_shards else []

    def train_loader(self, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        sampler = ClipSampler(
            self.num_frames, self.frame_stride, self.size, random_start=True, random_crop=self.random_crop
        )
        dataset = VideoShardDataset(
            self.train_shard_list,
            sampler,
            self.batch_size,
            resampled=True,
            seed=seed,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world_size,
            drop_last=True,
            skips=self.skips,
        )
        return self._loader(dataset, self.num_workers)

    def eval_loader(self, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
        if not self.eval_shard_list:
            raise ValueError("eval_shards is not set")
        sampler = ClipSampler(self.num_frames, self.frame_stride, self.size, random_start=False, random_crop=False)
        dataset = VideoShardDataset(
            self.eval_shard_list,
            sampler,
            self.batch_size,
            resampled=False,
            rank=rank,
            world_size=world_size,
            skips=self.skips,
        )
        return self._loader(dataset, num_workers)

    @staticmethod
    def _loader(dataset: VideoShardDataset, num_workers: int) -> DataLoader:
        # the dataset batches itself (batch_size=None), so each worker yields whole VideoBatches
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )
