"""Stream captioned clips from WebDataset shards into VideoBatches.

Order is a pure function of (seed, rank, worker, position): each worker draws from its own
generator seeded with those numbers, so runs are reproducible and a stream can be re-derived.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from vdm.data.shards import TruncatedShard, iter_tar_files
from vdm.data.skips import SkipCounter
from vdm.data.transforms import frames_to_clip
from vdm.data.video import DecodeError, decode_frames, probe_num_frames
from vdm.types import VideoBatch

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


class SkipSample(Exception):
    def __init__(self, reason: str, message: str = ""):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClipSampler:
    """Which frames of a video make a clip, and how they are shaped."""

    num_frames: int
    frame_stride: int
    size: int
    random_start: bool
    random_crop: bool

    @property
    def span(self) -> int:
        """Frames of the source covered by one clip."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        """A raw sample ({'__key__', 'mp4', 'txt', 'json'?}) -> {'video', 'caption', 'key', 'fps'}."""
        video_ext = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
        if video_ext is None:
            raise SkipSample("missing_video", f"no video among {sorted(k for k in sample if not k.startswith('__'))}")
        caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
        if not caption:
            raise SkipSample("missing_caption", "caption is missing or empty")
        meta = _read_json(sample.get("json"))
        data = sample[video_ext]
        try:
            total = int(meta.get("frames") or 0) or probe_num_frames(data)
            if total is not None and total < self.span:
                raise SkipSample("too_short", f"{total} frames, clip needs {self.span}")
            last_start = (total - self.span) if total is not None else 0
            start = int(rng.integers(last_start + 1)) if self.random_start else 0
            frames = decode_frames(data, range(start, start + self.span, self.frame_stride))
        except DecodeError as error:
            reason = "too_short" if "frames needed" in str(error) else "decode_error"
            raise SkipSample(reason, str(error)) from error
        offset = tuple(rng.random(2)) if self.random_crop else (0.5, 0.5)
        source_fps = float(meta.get("fps") or 0.0)
        return {
            "video": frames_to_clip(frames, self.size, offset),
            "caption": caption,
            "key": sample["__key__"],
            "fps": source_fps / self.frame_stride,
        }


def _read_json(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def collate(samples: list[dict]) -> VideoBatch:
    return VideoBatch(
        video=torch.stack([s["video"] for s in samples]),
        captions=[s["caption"] for s in samples],
        keys=[s["key"] for s in samples],
        fps=torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
    )


class VideoShardDataset(IterableDataset):
    """Batches of clips from tar shards.

    resampled=True: an endless stream; each worker draws shards with replacement and shuffles
    samples in a buffer (training). resampled=False: one pass in order, shards split by rank then
    by worker, every sample exactly once (evaluation).
    A sample that cannot be used, or the rest of a shard that cannot be read, is skipped and
    counted in `skips`; the stream goes on.
    """

    def __init__(
        self,
        shards: list[str],
        sampler: ClipSampler,
        batch_size: int,
        *,
        resampled: bool,
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        skips: SkipCounter | None = None,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) (rank={rank}, world_size={world_size})")
        self.shards = list(shards)
        self.sampler = sampler
        self.batch_size = batch_size
        self.resampled = resampled
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.skips = skips if skips is not None else SkipCounter()

    def __iter__(self) -> Iterator[VideoBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.rank, worker])
        clips = (
            clip for clip in map(lambda s: self._decode(s, rng), self._raw_samples(rng, worker, num_workers)) if clip
        )
        if self.shuffle_buffer > 1:
            clips = _shuffled(clips, self.shuffle_buffer, rng)
        batch: list[dict] = []
        for clip in clips:
            batch.append(clip)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch)

    def _shard_order(self, rng: np.random.Generator, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            while True:
                yield self.shards[int(rng.integers(len(self.shards)))]
        else:
            yield from self.shards[self.rank :: self.world_size][worker::num_workers]

    def _raw_samples(self, rng: np.random.Generator, worker: int, num_workers: int) -> Iterator[dict]:
        """Samples ({'__key__', '__url__', ext: bytes}) of this worker's shards, in order."""

        def files() -> Iterator[dict]:
            for shard in self._shard_order(rng, worker, num_workers):
                try:
                    with open(shard, "rb") as stream:
                        for file in iter_tar_files(stream, shard):
                            yield file | {"__url__": shard}
                except (OSError, tarfile.TarError, EOFError, zlib.error, TruncatedShard) as error:
                    # what was read before the error stands; the rest of the shard is lost
                    self.skips.add("shard_error", f"rest of {shard}", error)
                yield {}  # end of shard: a sample never spans two shards

        yield from group_by_keys(files())

    def _decode(self, sample: dict, rng: np.random.Generator) -> dict | None:
        try:
            return self.sampler(sample, rng)
        except SkipSample as skip:
            self.skips.add(skip.reason, f"{sample.get('__url__')}:{sample.get('__key__')}", skip)
            return None


def _shuffled(items: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle a stream through a buffer: emit a random element once the buffer is full."""
    buffer: list[dict] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            index = int(rng.integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
