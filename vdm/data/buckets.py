"""Buckets: each batch has one clip shape (frames, height, width); each shape has its own batch size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    frames: int  # 1: an image bucket
    height: int
    width: int
    batch_size: int

    def __post_init__(self):
        for name in ("frames", "height", "width", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"bucket {name} must be a positive int (got {getattr(self, name)!r})")

    @property
    def aspect(self) -> float:
        return self.width / self.height


def choose_bucket(
    buckets: Sequence[Bucket], width: int, height: int, available_frames: int, is_image: bool
) -> int | None:
    """Index of the bucket for a source of this size and length, or None if none fits.

    Images go to one-frame buckets, videos to the others, among those whose length the source can fill.
    The closest aspect ratio wins (log distance, so 2:1 and 1:2 are equally far from 1:1; ratios within
    5% count as equal); then a bucket the source need not be upscaled for, the largest such (resolution
    buckets); then the longest.
    """
    aspect = width / height
    candidates = [
        (
            round(abs(math.log(bucket.aspect / aspect)) / 0.05),
            bucket.height > height or bucket.width > width,  # would upscale
            -bucket.height * bucket.width
            if bucket.height <= height and bucket.width <= width
            else bucket.height * bucket.width,  # among upscaling ones: the least
            -bucket.frames,
            index,
        )
        for index, bucket in enumerate(buckets)
        if (bucket.frames == 1) == is_image and bucket.frames <= available_frames
    ]
    return min(candidates)[-1] if candidates else None
