"""Video bytes <-> frames: decode only the frames a clip needs (PyAV, or torchcodec if chosen); encode mp4 and gif.

Frames are uint8 arrays shaped (T, H, W, 3), RGB, upright: a display-matrix rotation (phone videos)
is applied, so H and W are the size as displayed.

A frame index counts displayed frames: index i is the i-th frame in presentation order, whatever the
decode order (B-frames) and whatever the timestamps (variable frame rate). Indices count frames, not
time: on a variable-frame-rate source, evenly spaced indices are not evenly spaced in time.
Only the first video stream is read; the packets of every other stream (audio, subtitles, data) are
discarded by the demuxer, never decoded.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.stream import Discard
from av.video.reformatter import VideoReformatter
from PIL import Image

BACKENDS = ("pyav", "torchcodec")
BACKEND_ENV = "VDM_VIDEO_BACKEND"  # the backend decode_frames uses when none is passed; pyav when unset

# Codec options for the decoders avformat_find_stream_info opens while av.open probes the streams: it
# decoded the first H.264 frame only to throw it away (0.5-1 ms a file, 5% of a 16-frame 256x256 clip).
# Measured on H.264 (mp4, mkv, B-frames, 4:4:4), HEVC, VP9, MPEG-4 (mp4, avi) and MJPEG: the same
# stream info and the same frames with and without. The decoders that make the frames are opened anew.
_OPEN_OPTIONS = {"skip_frame": "all"}


class DecodeError(Exception):
    """The bytes are not a video that can be decoded, or hold fewer frames than asked for."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says about its first video stream."""

    num_frames: int | None  # as the container declares it; None when it does not say (webm, some mkv)
    fps: float | None  # average frame rate (the guessed one when there is none); None when unknown
    width: int  # as displayed, i.e. after rotation: the W of the frames decode_frames returns
    height: int
    rotation: int  # degrees counter-clockwise that turn a stored frame upright: 0, 90, 180 or 270


def probe(data: bytes) -> VideoInfo:
    """Frame count, frame rate, displayed size and rotation of a video; DecodeError if it cannot be decoded.

    Decodes the first frame: FFmpeg hands the rotation to PyAV only on decoded frames, and it proves the
    stream decodes. That costs 2-4 ms for 256x256 H.264 (with B-frames the decoder takes three packets
    to give out the first frame), a quarter of decoding a 16-frame clip: a caller that has the size,
    rate and length from the sample's metadata saves it.
    """
    try:
        with av.open(io.BytesIO(data), options=_OPEN_OPTIONS) as container:
            stream = _video_stream(container, threads=1)
            rate = stream.average_rate or stream.guessed_rate
            first = next(container.decode(stream), None)
            if first is None:
                raise DecodeError("video stream has no frames")
            rotation = _quarter_turns(first.rotation) * 90
            width, height = first.width, first.height
            num_frames = stream.frames or None
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise DecodeError(f"cannot probe video: {error}") from error
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(num_frames, float(rate) if rate else None, width, height, rotation)


def decode_frames(data: bytes, indices: Sequence[int], backend: str | None = None, *, threads: int = 1) -> np.ndarray:
    """The frames at `indices` (presentation order; any order, repeats allowed) -> (len(indices), H, W, 3) uint8.

    Decoding stops at the largest index, so a short clip from a long video costs only the frames up to
    its end. backend: "pyav" or "torchcodec"; None takes $VDM_VIDEO_BACKEND, else "pyav".
    threads (PyAV only): decoder threads. 1 gives the most clips per core, which is what DataLoader
    workers that already fill the cores need; 0 lets FFmpeg pick (frame and slice threading): on 2
    cores, 16 frames of 256x256 took 10% less wall time but 5-50% more CPU time.
    """
    backend = backend or os.environ.get(BACKEND_ENV) or "pyav"
    if backend == "pyav":
        return _decode_pyav(data, indices, threads)
    if backend == "torchcodec":
        return decode_frames_torchcodec(data, indices)
    raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")


def _decode_pyav(data: bytes, indices: Sequence[int], threads: int) -> np.ndarray:
    slots = _slots(indices)
    last = max(slots)
    out: np.ndarray | None = None
    found = 0
    try:
        with av.open(io.BytesIO(data), options=_OPEN_OPTIONS) as container:
            stream = _video_stream(container, threads)
            # frame.to_ndarray(format="rgb24") builds a swscale context per frame with an automatic thread
            # count, i.e. a new thread pool per frame: 4-6 ms of wall time for 16 frames of 256x256, a
            # quarter of the whole decode. One reused single-threaded context converts them in 0.4 ms.
            reformatter = VideoReformatter()
            for index, frame in enumerate(container.decode(stream)):
                if index in slots:
                    if out is None:
                        stored, rotation = (frame.height, frame.width), frame.rotation
                        shape = stored[::-1] if _quarter_turns(rotation) % 2 else stored
                        out = np.empty((len(indices), *shape, 3), dtype=np.uint8)
                    # scaling to the first frame's size only does something if the size changes mid-stream
                    rgb = reformatter.reformat(
                        frame, width=stored[1], height=stored[0], format="rgb24", threads=1
                    ).to_ndarray()
                    positions = slots[index]
                    out[positions[0]] = rotate_upright(rgb, rotation)
                    for position in positions[1:]:
                        out[position] = out[positions[0]]
                    found += 1
                if index >= last:
                    break
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise DecodeError(f"cannot decode video: {error}") from error
    if found < len(slots):
        raise DecodeError(f"video has {found} of the {len(slots)} frames needed (last index {last})")
    return out


def decode_frames_torchcodec(data: bytes, indices: Sequence[int]) -> np.ndarray:
    """decode_frames with torchcodec (optional: `pip install torchcodec==0.13.0`, and system FFmpeg for it).

    Same frames as PyAV: presentation order, rotation applied by torchcodec itself.
    """
    slots = _slots(indices)
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as error:  # torchcodec raises RuntimeError, not ImportError, when FFmpeg is missing
        raise ImportError(
            f"the torchcodec video backend needs torchcodec 0.13 and system FFmpeg ({error}); "
            f"use the default backend 'pyav' or unset {BACKEND_ENV}"
        ) from error
    last = max(slots)
    try:
        decoder = VideoDecoder(data, dimension_order="NHWC")
        total = decoder.metadata.num_frames
        if total is not None and total <= last:
            found = sum(index < total for index in slots)
            raise DecodeError(f"video has {found} of the {len(slots)} frames needed (last index {last})")
        frames = decoder.get_frames_at(list(indices)).data
    except (RuntimeError, ValueError, IndexError) as error:
        raise DecodeError(f"cannot decode video: {error}") from error
    return frames.numpy()


def rotate_upright(frames: np.ndarray, rotation: float) -> np.ndarray:
    """(..., H, W, C) frames stored with a display rotation of `rotation` degrees counter-clockwise -> upright.

    The convention of FFmpeg's display matrix (PyAV's frame.rotation, ffprobe's `rotation`): a phone
    video shot in portrait says -90 (turn its frames 90 degrees clockwise to display them).
    """
    return np.rot90(frames, _quarter_turns(rotation), axes=(-3, -2))


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


def _video_stream(container: av.container.InputContainer, threads: int) -> av.video.stream.VideoStream:
    """The first video stream, set to decode with `threads` threads; every other stream is discarded."""
    if not container.streams.video:
        raise DecodeError("no video stream")
    stream = container.streams.video[0]
    for other in container.streams:
        if other.index != stream.index:
            other.discard = Discard.all  # the demuxer drops their packets unread
    stream.codec_context.thread_count = threads
    if threads != 1:
        stream.thread_type = "AUTO"
    return stream


def _slots(indices: Sequence[int]) -> dict[int, list[int]]:
    """frame index -> the positions in `indices` that want it."""
    slots: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        if int(index) != index or index < 0:
            raise ValueError(f"frame indices must be non-negative integers (got {index!r})")
        slots.setdefault(int(index), []).append(position)
    if not slots:
        raise ValueError("indices is empty")
    return slots


def _quarter_turns(rotation: float) -> int:
    """A display rotation in degrees counter-clockwise (any sign) -> quarter turns in 0..3."""
    return round(rotation / 90) % 4


def _even_sized(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: pad odd ones by repeating the last row/column."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames
