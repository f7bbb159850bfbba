"""VideoData: what a data config describes, and the loaders it builds."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from vdm.data.buckets import Bucket
from vdm.data.cache import Cache, CachedClipMaker, StaleCache, shard_entry, transforms_key
from vdm.data.clips import ClipMaker, FrameSampling
from vdm.data.pipeline import VideoShardDataset
from vdm.data.shards import REMOTE_SCHEMES, expand_shards
from vdm.data.skips import SkipCounter
from vdm.data.stream import Source
from vdm.signals import deferred, ignore_stop_signals

log = logging.getLogger(__name__)


@dataclass
class VideoData:
    """Shards, clip shapes and loading for training and held-out evaluation.

    Local shard paths are relative to the directory train.py is started from. With `cache` (a folder that
    scripts/precompute.py wrote from these shards), training and the held-out loss read the cached latents and
    text features instead (vdm.data.cache); the run checks first that the cache was made with its settings.
    """

    train_shards: str | None = None  # brace pattern of tar / tar.gz shards: the one training source
    sources: list[dict] | None = None  # instead of train_shards, a mixture: [{shards: ..., weight: ...}, ...]
    eval_shards: str | None = None  # held-out shards, read in one plain pass
    num_frames: int = 8  # frames per clip
    frame_stride: int = 1  # take every k-th frame of the source...
    fps: float | None = None  # ...or the stride closest to this frame rate, where the source's rate is known
    size: int = 32  # clips are size x size after resize and crop...
    buckets: list[dict] | None = None  # ...or one of these shapes: [{frames, height, width, batch_size}, ...]
    batch_size: int = 16  # clips per batch on each process
    image_batch_size: int = 0  # > 0: images train as one-frame clips, in batches of this size
    short_clips: str = "skip"  # sources shorter than every bucket: skip, or pad with their last frame
    num_workers: int = 1  # loader processes per training process
    shuffle_buffer: int = 512  # raw samples held for shuffling in each worker
    random_crop: bool = True  # train only; evaluation crops the centre and starts at the first frame
    random_start: bool = True  # train only: a clip starts at a random frame (false: at the first, as evaluation's)
    cache: str | None = None  # a latent cache of these shards (scripts/precompute.py) to train from
    eval_clips: int = 256  # held-out clips used for the held-out loss
    max_skip_fraction: float = 0.1  # stop when more than this share of samples cannot be used
    remote_schemes: list[str] = field(default_factory=lambda: list(REMOTE_SCHEMES))  # besides local paths
    skips: SkipCounter = field(init=False, repr=False)

    def __post_init__(self):
        for name in ("num_frames", "frame_stride", "size", "batch_size", "eval_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("num_workers", "shuffle_buffer", "image_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0 (got {self.fps})")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1] (got {self.max_skip_fraction})")
        if (self.train_shards is None) == (self.sources is None):
            raise ValueError("set exactly one of train_shards and sources")
        raw_sources = self.sources if self.sources is not None else [{"shards": self.train_shards, "weight": 1.0}]
        self.train_sources = []
        for index, source in enumerate(raw_sources):
            unknown = set(source) - {"shards", "weight"}
            if unknown or "shards" not in source:
                raise ValueError(f"sources[{index}] needs shards (and optionally weight), got keys {sorted(source)}")
            if float(source.get("weight", 1.0)) <= 0:
                raise ValueError(f"sources[{index}].weight must be > 0")
            # a cache outlives its sources: with one, the source shards need not be here any more
            shards = expand_shards(source["shards"], self.remote_schemes, must_exist=self.cache is None)
            self.train_sources.append(Source(tuple(shards), float(source.get("weight", 1.0))))
        self.eval_shard_list = (
            expand_shards(self.eval_shards, self.remote_schemes, must_exist=self.cache is None)
            if self.eval_shards
            else []
        )
        # what the shards are, before a cache replaces them as what is read
        self.source_key = {
            "sources": [[shard_entry(url) for url in source.shards] for source in self.train_sources],
            "eval": [shard_entry(url) for url in self.eval_shard_list],
        }
        self.sample_size = (self.size, self.size)  # (height, width) of sample videos
        self.bucket_list = self._buckets()
        FrameSampling(short_clips=self.short_clips)  # checks short_clips
        self.skips = SkipCounter(max_fraction=self.max_skip_fraction)
        self.latent_cache = self._open_cache() if self.cache is not None else None

    def _open_cache(self) -> Cache:
        """The cache, which replaces the shards as what is read; its key is checked against the run's by
        vdm.run_checks (which has the autoencoder and text encoder to compare)."""
        cache = Cache.open(self.cache)
        made = cache.key
        for name, wanted in (("sources", self.source_key["sources"]), ("eval", self.source_key["eval"])):
            if len(made[name]) != len(wanted):
                raise StaleCache(
                    f"the latent cache {self.cache} holds {len(made[name])} {name} entries, this config has "
                    f"{len(wanted)}: make a cache of these shards"
                )
        self.train_sources = cache.sources([source.weight for source in self.train_sources])
        self.eval_shard_list = [str(path) for path in cache.eval_shards()]
        reports = cache.reports()
        skipped = {}
        for report in reports:
            for reason, count in report["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
        # what the pipeline could not use was skipped (and counted) when the cache was made
        log.info(
            "data.cache %s: %d clips in %d of %d shards, %s view(s), %s; skipped by precompute: %s",
            self.cache,
            sum(r["clips"] for r in reports),
            len(reports),
            len(cache.all_shards()),
            cache.manifest["views"],
            cache.manifest["dtype"],
            skipped or "none",
        )
        return cache

    def transforms_key(self) -> dict:
        """What turns a source sample into a clip here (the cache key's transforms)."""
        return transforms_key(self.bucket_list, self.frame_stride, self.fps, self.short_clips)

    def _buckets(self) -> list[Bucket]:
        if self.buckets:
            return self._given_buckets()
        buckets = [Bucket(self.num_frames, self.size, self.size, self.batch_size)]
        if self.image_batch_size:
            buckets.append(Bucket(1, self.size, self.size, self.image_batch_size))
        return buckets

    def _given_buckets(self) -> list[Bucket]:
        """data.buckets, checked key by key; num_frames, size and batch_size then follow the first video bucket
        (what samples are drawn at and the global batch is counted in), and the log says so."""
        keys = ("frames", "height", "width", "batch_size")
        buckets = []
        for index, bucket in enumerate(self.buckets):
            if not isinstance(bucket, dict):
                raise ValueError(f"buckets[{index}]: expected {{{', '.join(keys)}}}, got {bucket!r}")
            unknown, missing = sorted(set(bucket) - set(keys)), [k for k in keys if k not in bucket]
            if unknown or missing:
                raise ValueError(
                    f"buckets[{index}]: "
                    + "; ".join(
                        [f"unknown key {k!r}" for k in unknown] + [f"missing {', '.join(missing)}"] * bool(missing)
                    )
                    + f" (a bucket has {', '.join(keys)})"
                )
            try:
                buckets.append(Bucket(**bucket))
            except ValueError as error:
                raise ValueError(f"buckets[{index}]: {error}") from error
        if self.image_batch_size:
            raise ValueError(
                "image_batch_size: with buckets, images train in a bucket of frames: 1 (add one to buckets) "
                "instead; set data.image_batch_size=0"
            )
        first = next((b for b in buckets if b.frames > 1), buckets[0])
        derived = {"num_frames": first.frames, "size": max(first.height, first.width), "batch_size": first.batch_size}
        changed = {k: (getattr(self, k), v) for k, v in derived.items() if getattr(self, k) != v}
        if changed:
            log.info(
                "data.buckets is set: %s follow its first video bucket (%dx%dx%d, batch %d), used for samples and "
                "the global batch; every clip takes its bucket's shape and batch size",
                ", ".join(f"data.{k} {old} -> {new}" for k, (old, new) in changed.items()),
                first.frames,
                first.height,
                first.width,
                first.batch_size,
            )
        self.num_frames, self.size, self.batch_size = first.frames, max(first.height, first.width), first.batch_size
        self.sample_size = (first.height, first.width)
        return buckets

    def clip_maker(self, train: bool, cached: bool | None = None) -> ClipMaker | CachedClipMaker:
        """What turns a sample into a clip: of the cache when there is one (unless `cached=False`), else of a source."""
        if self.latent_cache is not None and cached is not False:
            return CachedClipMaker(self.bucket_list, self.latent_cache.digest, train=train)
        sampling = FrameSampling(
            self.frame_stride,
            self.fps,
            random_start=train and self.random_start,
            random_crop=train and self.random_crop,
            short_clips=self.short_clips,
        )
        return ClipMaker(self.bucket_list, sampling)

    def train_dataset(self, seed: int, rank: int = 0, world_size: int = 1, resume: dict | None = None):
        slots = world_size * max(self.num_workers, 1)
        for index, source in enumerate(self.train_sources):
            if len(source.shards) < slots:
                raise ValueError(
                    f"sources[{index}] has {len(source.shards)} shards, fewer than the {slots} loader "
                    f"workers of all ranks ({world_size} ranks x {max(self.num_workers, 1)}): each reads "
                    "whole shards, so write smaller shards or lower data.num_workers"
                )
        return VideoShardDataset(
            self.train_sources,
            self.clip_maker(train=True),
            resampled=True,
            seed=seed,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world_size,
            drop_last=True,
            skips=self.skips,
            resume=resume,
        )

    def train_loader(self, seed: int, rank: int = 0, world_size: int = 1, resume: dict | None = None) -> DataLoader:
        return self._loader(self.train_dataset(seed, rank, world_size, resume), self.num_workers)

    def eval_loader(self, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
        if not self.eval_shard_list:
            raise ValueError("eval_shards is not set")
        dataset = VideoShardDataset(
            self.eval_shard_list,
            self.clip_maker(train=False),
            resampled=False,
            rank=rank,
            world_size=world_size,
            skips=self.skips,
        )
        return self._loader(dataset, num_workers)

    @staticmethod
    def _loader(dataset: VideoShardDataset, num_workers: int) -> DataLoader:
        # the dataset batches itself (batch_size=None): each worker yields whole VideoBatches of one bucket
        return WorkerSafeLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            # pinned host memory: the copy to the GPU runs asynchronously (VideoBatch.to is non-blocking)
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_stop_signals,
        )


class WorkerSafeLoader(DataLoader):
    """A DataLoader whose worker processes survive Slurm's stop signals (see vdm.signals): they are started with
    SIGUSR1 and SIGTERM blocked and ignore them from their first line, so only the training process acts on them."""

    def __iter__(self):
        with deferred():  # the workers start here (once, with persistent workers)
            return super().__iter__()
