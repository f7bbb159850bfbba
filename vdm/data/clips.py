"""One raw sample (bytes from a shard) -> one clip for a bucket: which frames, decoded, resized, cropped."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vdm.data.buckets import Bucket, choose_bucket
from vdm.data.transforms import frames_to_clip
from vdm.data.video import DecodeError, decode_frames, probe

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SkipSample(Exception):
    """A sample the pipeline cannot use; `reason` is one of vdm.data.skips.REASONS."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a source make a clip."""

    frame_stride: int = 1  # take every k-th frame
    fps: float | None = None  # if set and the source's fps is known: the stride that comes closest to this rate
    random_start: bool = True  # else the clip starts at the first frame
    random_crop: bool = True  # else the crop is centred
    short_clips: str = "skip"  # a source too short for every bucket: skip it, or pad by repeating its last frame

    def __post_init__(self):
        if self.short_clips not in ("skip", "pad"):
            raise ValueError(f"short_clips must be skip or pad (got {self.short_clips!r})")

    def stride_for(self, source_fps: float | None) -> int:
        if self.fps and source_fps:
            return max(1, round(source_fps / self.fps))
        return self.frame_stride


class ClipMaker:
    """Turns a raw sample into (bucket index, clip) or raises SkipSample."""

    def __init__(self, buckets: Sequence[Bucket], sampling: FrameSampling):
        if not buckets:
            raise ValueError("at least one bucket is needed")
        self.buckets = list(buckets)
        self.sampling = sampling

    def __call__(self, sample: dict, rng: np.random.Generator) -> tuple[int, dict]:
        caption = _caption(sample)
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        video_ext = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
        if video_ext is not None:
            bucket_index, frames, fps = self._video(sample[video_ext], _read_json(sample.get("json")), rng)
        elif image_ext is not None:
            bucket_index, frames, fps = self._image(sample[image_ext])
        else:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise SkipSample("missing_video", f"no video or image among {found}")
        bucket = self.buckets[bucket_index]
        offset = tuple(rng.random(2)) if self.sampling.random_crop else (0.5, 0.5)
        clip = {
            "video": frames_to_clip(frames, bucket.height, bucket.width, offset),
            "caption": caption,
            "key": sample["__key__"],
            "fps": fps,
        }
        return bucket_index, clip

    def _video(self, data: bytes, meta: dict, rng: np.random.Generator) -> tuple[int, np.ndarray, float]:
        try:
            if all(meta.get(k) for k in ("frames", "fps", "width", "height")):
                total, source_fps, width, height = (
                    int(meta["frames"]),
                    float(meta["fps"]),
                    meta["width"],
                    meta["height"],
                )
            else:
                info = probe(data)
                total, source_fps, width, height = info.num_frames, info.fps, info.width, info.height
        except DecodeError as error:
            raise SkipSample("decode_error", str(error)) from error
        stride = self.sampling.stride_for(source_fps)
        # frames the clip can have at this stride; unknown length: assume enough, decoding will tell
        available = (total - 1) // stride + 1 if total else 1 << 30
        bucket_index = choose_bucket(self.buckets, width, height, available, is_image=False)
        if bucket_index is None and all(bucket.frames == 1 for bucket in self.buckets):
            # image training (num_frames=1, experiment=image_pretrain): a video gives one of its frames
            bucket_index = choose_bucket(self.buckets, width, height, available, is_image=True)
        if bucket_index is None and self.sampling.short_clips == "pad":
            bucket_index = choose_bucket(self.buckets, width, height, 1 << 30, is_image=False)
        if bucket_index is None:
            raise SkipSample("too_short", f"{total} frames at stride {stride} fit no bucket")
        span = (self.buckets[bucket_index].frames - 1) * stride + 1
        last_start = max(0, total - span) if total else 0
        start = int(rng.integers(last_start + 1)) if self.sampling.random_start else 0
        indices = list(range(start, start + span, stride))
        if total:  # pad: repeat the last frame where the source ends
            indices = [min(i, total - 1) for i in indices]
        try:
            frames = decode_frames(data, indices)
        except DecodeError as error:
            reason = "too_short" if "frames needed" in str(error) else "decode_error"
            raise SkipSample(reason, str(error)) from error
        return bucket_index, frames, (source_fps or 0.0) / stride

    def _image(self, data: bytes) -> tuple[int, np.ndarray, float]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                frame = np.array(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise SkipSample("decode_error", f"cannot decode image: {error}") from error
        bucket_index = choose_bucket(self.buckets, frame.shape[1], frame.shape[0], 1, is_image=True)
        if bucket_index is None:
            raise SkipSample("no_bucket", "an image, and no one-frame bucket is configured")
        return bucket_index, frame[None], 0.0


def _caption(sample: dict) -> str:
    caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        raise SkipSample("missing_caption", "caption is missing or empty")
    return caption


def _read_json(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}
