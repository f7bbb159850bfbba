"""Video bytes <-> frames with PyAV: decode only the frames a clip needs; encode mp4 and gif.

Frames are uint8 arrays shaped (T, H, W, 3), RGB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image


class DecodeError(Exception):
    """The bytes are not a video PyAV can decode, or hold fewer frames than asked for."""


def probe_num_frames(data: bytes) -> int | None:
    """The frame count the container declares, or None when it does not say."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = container.streams.video[0].frames
    except (av.FFmpegError, IndexError) as error:
        raise DecodeError(f"cannot open video: {error}") from error
    return frames or None


def decode_frames(data: bytes, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (ascending, presentation order) -> (len(indices), H, W, 3) uint8.

    Decoding stops at the last index wanted, so a short clip from a long video costs only the frames
    up to its end.
    """
    wanted = sorted(set(indices))
    if not wanted:
        raise ValueError("indices is empty")
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    break
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise DecodeError(f"cannot decode video: {error}") from error
    if len(frames) < len(wanted):
        raise DecodeError(f"video has {len(frames)} of the {len(wanted)} frames needed (last index {wanted[-1]})")
    return np.stack([frames[i] for i in indices])


def encode_mp4(frames: np.ndarray, fps: int, qp: int = 20) -> bytes:
    """(T, H, W, 3) uint8 -> H.264 mp4 bytes at constant quantizer `qp`. Same frames, same bytes."""
    frames = _even_sized(frames)
    num_frames, height, width, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # x264 in CRF mode (its mb-tree rate control) was seen to give different bytes for the same frames
        # from run to run; constant-quantizer mode with one thread is a pure function of its input, so
        # datasets rebuild bit-for-bit.
        stream.options = {"qp": str(qp), "preset": "medium", "x264-params": "threads=1"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def encode_gif(frames: np.ndarray, fps: int) -> bytes:
    """(T, H, W, 3) uint8 -> looping gif bytes."""
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def _even_sized(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: pad odd ones by repeating the last row/column."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames
