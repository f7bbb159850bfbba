"""Real files decode right: B-frames, audio tracks, variable frame rate, odd sizes, rotation, webm/VP9.

Every file is written here with PyAV from frames whose content tells their index (a bar that moves, a
blue level that rises) and their orientation (red grows to the right, green downwards), so each check
compares decoded frames with the frames that went in.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pytest

from vdm.data import video
from vdm.data.video import DecodeError, VideoInfo, decode_frames, probe, rotate_upright

FPS = 8


def source_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8: red ramps left to right, green top to bottom, blue and a white bar move with t."""
    yy, xx = np.mgrid[0:height, 0:width]
    bar = max(3, width // 12)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = 20 + 200 * xx // max(1, width - 1)
        frames[t, ..., 1] = 20 + 200 * yy // max(1, height - 1)
        frames[t, ..., 2] = 30 + 180 * t // max(1, num_frames - 1)
        left = (width - bar) * t // max(1, num_frames - 1)
        frames[t, :, left : left + bar] = 255
    return frames


def encode(
    frames: np.ndarray,
    codec: str = "libx264",
    container_format: str = "mp4",
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
    rotation: int | None = None,
    pts_ms: list[int] | None = None,
    audio: bool = False,
) -> bytes:
    """Frames -> a video file's bytes; audio=True adds a 440 Hz AAC track as stream 0, before the video."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        if audio:
            audio_stream = container.add_stream("aac", rate=16000)
            audio_stream.layout = "mono"
        stream = container.add_stream(codec, rate=FPS)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": "18", **(options or {})} if codec == "libx264" else dict(options or {})
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        samples = 0
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[t], Fraction(1, 1000)
            container.mux(stream.encode(frame))
            while audio and samples < (t + 1) * 16000 // FPS:
                wave = np.sin(2 * np.pi * 440 * (samples + np.arange(1024)) / 16000).astype(np.float32)
                chunk = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, samples
                container.mux(audio_stream.encode(chunk))
                samples += 1024
        container.mux(stream.encode())
        if audio:
            container.mux(audio_stream.encode())
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    data: bytes
    upright: np.ndarray  # the frames as they should come out
    num_frames: int | None  # what probe should say
    fps: float | None  # None: a variable rate, where probe gives FFmpeg's average
    rotation: int = 0


def rotated_case(rotation: int) -> Case:
    upright = source_frames(8, 48, 32)  # portrait, as a phone shoots it
    turns = round(rotation / 90) % 4
    stored = np.ascontiguousarray(np.rot90(upright, -turns, axes=(1, 2)))  # what the camera wrote
    return Case(encode(stored, rotation=rotation, pix_fmt="yuv444p"), upright, 8, FPS, turns * 90)


VFR_PTS_MS = [0, 40, 80, 300, 310, 320, 600, 640, 1000, 1010]


def build(name: str) -> Case:
    if name == "h264":
        frames = source_frames(12, 48, 64)
        return Case(encode(frames), frames, 12, FPS)
    if name == "h264_bframes":
        frames = source_frames(12, 48, 64)
        return Case(encode(frames, options={"x264-params": "bframes=3:b-adapt=0"}), frames, 12, FPS)
    if name == "h264_with_aac_audio":
        frames = source_frames(12, 48, 64)
        return Case(encode(frames, audio=True), frames, 12, FPS)
    if name == "h264_variable_frame_rate":
        frames = source_frames(len(VFR_PTS_MS), 48, 64)
        return Case(encode(frames, pts_ms=VFR_PTS_MS), frames, len(VFR_PTS_MS), None)
    if name == "h264_318x242":  # not a multiple of 16: the decoder crops its padded macroblocks
        frames = source_frames(6, 242, 318)
        return Case(encode(frames), frames, 6, FPS)
    if name == "h264_444_odd_317x241":  # 4:2:0 needs even sizes; 4:4:4 does not
        frames = source_frames(6, 241, 317)
        return Case(encode(frames, pix_fmt="yuv444p"), frames, 6, FPS)
    if name == "vp9_webm":
        frames = source_frames(10, 48, 64)
        return Case(encode(frames, "libvpx-vp9", "webm", options={"crf": "20", "b": "0"}), frames, None, FPS)
    if name == "vp9_webm_odd_63x47":
        frames = source_frames(6, 47, 63)
        return Case(encode(frames, "libvpx-vp9", "webm", options={"crf": "20", "b": "0"}), frames, None, FPS)
    if name.startswith("rotated_"):
        return rotated_case(int(name.removeprefix("rotated_")))
    raise ValueError(name)


CASES = [
    "h264",
    "h264_bframes",
    "h264_with_aac_audio",
    "h264_variable_frame_rate",
    "h264_318x242",
    "h264_444_odd_317x241",
    "vp9_webm",
    "vp9_webm_odd_63x47",
    "rotated_90",
    "rotated_-90",
    "rotated_180",
]


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {name: build(name) for name in CASES}


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def closest_source(decoded: np.ndarray, source: np.ndarray) -> list[int]:
    """For each decoded frame, the index of the source frame it is nearest to."""
    errors = np.abs(decoded[:, None].astype(np.float32) - source[None].astype(np.float32)).mean(axis=(2, 3, 4))
    return errors.argmin(axis=1).tolist()


@pytest.mark.parametrize("name", CASES)
def test_every_frame_decodes_upright_and_in_presentation_order(cases, name):
    case = cases[name]
    decoded = decode_frames(case.data, range(len(case.upright)))
    assert decoded.shape == case.upright.shape and decoded.dtype == np.uint8
    assert closest_source(decoded, case.upright) == list(range(len(case.upright)))
    for t in range(len(decoded)):
        assert mean_abs_error(decoded[t], case.upright[t]) < 10, f"frame {t}"


@pytest.mark.parametrize("name", CASES)
def test_probe_reports_displayed_size_rate_and_count(cases, name):
    case = cases[name]
    info = probe(case.data)
    height, width = case.upright.shape[1:3]
    fps = pytest.approx(case.fps, rel=1e-3) if case.fps else info.fps
    assert info == VideoInfo(case.num_frames, fps, width, height, case.rotation)
    if case.fps is None:  # some average of instantaneous rates from 2.8 to 100 per second
        assert 5 < info.fps < 20


@pytest.mark.parametrize("name", ["h264_bframes", "vp9_webm", "rotated_90"])
def test_indices_in_any_order_with_repeats(cases, name):
    case = cases[name]
    every = decode_frames(case.data, range(len(case.upright)))
    indices = [3, 0, 0, 5, 3, 1]
    np.testing.assert_array_equal(decode_frames(case.data, indices), every[indices])
    np.testing.assert_array_equal(decode_frames(case.data, [2]), every[[2]])


def test_bframe_file_really_reorders(cases):
    """The B-frame case must have B-frames, so the order test above means something."""
    with av.open(io.BytesIO(cases["h264_bframes"].data)) as container:
        packets = [p for p in container.demux(video=0) if p.pts is not None]
    pts = [p.pts for p in packets]
    assert pts != sorted(pts), "decode order equals presentation order: no B-frames were written"
    with av.open(io.BytesIO(cases["h264_bframes"].data)) as container:
        kinds = [frame.pict_type for frame in container.decode(video=0)]
    assert av.video.frame.PictureType.B in kinds


def test_variable_frame_rate_file_has_uneven_timestamps(cases):
    with av.open(io.BytesIO(cases["h264_variable_frame_rate"].data)) as container:
        times = [round(float(frame.time) * 1000) for frame in container.decode(video=0)]
    assert times == VFR_PTS_MS  # frame indices count frames: index 3 is at 300 ms, not 3/8 s


def test_audio_track_comes_first_and_is_neither_demuxed_nor_decoded(cases, monkeypatch):
    data = cases["h264_with_aac_audio"].data
    with av.open(io.BytesIO(data)) as container:
        assert [s.type for s in container.streams] == ["audio", "video"]
    decoded_streams, discards = [], []
    real_decode = av.container.InputContainer.decode

    def spy(self, *streams, **kwargs):
        decoded_streams.extend(s.type for s in streams)
        discards.extend(s.discard for s in self.streams)
        return real_decode(self, *streams, **kwargs)

    monkeypatch.setattr(av.container.InputContainer, "decode", spy)
    assert decode_frames(data, [0, 11]).shape == (2, 48, 64, 3)
    assert decoded_streams == ["video"]
    # the demuxer skips the audio packets instead of handing them over to be dropped
    assert discards == [av.stream.Discard.all, av.stream.Discard.default]


def test_a_size_change_mid_stream_is_scaled_to_the_first_size():
    """Two H.264 streams back to back (a new SPS mid-stream): one array, the first stream's size."""

    def raw_h264(height: int, width: int, level: int) -> bytes:
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="h264") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
            for _ in range(4):
                image = np.full((height, width, 3), level, np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        return buffer.getvalue()

    frames = decode_frames(raw_h264(48, 64, 50) + raw_h264(96, 128, 200), range(8))
    assert frames.shape == (8, 48, 64, 3)
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [50] * 4 + [200] * 4, atol=4)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg command is not installed")
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_matches_the_ffmpeg_command_line(cases, rotation, tmp_path):
    """ffmpeg's autorotate is the reference for which way a display matrix turns a frame."""
    path = tmp_path / "rotated.mp4"
    path.write_bytes(cases[f"rotated_{rotation}"].data)
    command = ["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    ours = decode_frames(path.read_bytes(), [0])[0]
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(ours.shape), ours)


@pytest.mark.parametrize(("rotation", "turns"), [(0, 0), (90, 1), (-90, 3), (270, 3), (180, 2), (-180, 2)])
def test_rotate_upright_turns_counter_clockwise(rotation, turns):
    frames = np.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3)
    np.testing.assert_array_equal(rotate_upright(frames, rotation), np.rot90(frames, turns, axes=(1, 2)))
    np.testing.assert_array_equal(rotate_upright(frames[0], rotation), np.rot90(frames[0], turns))
    # 90 counter-clockwise: the top-right pixel goes to the top-left
    assert rotate_upright(frames[0], 90)[0, 0].tolist() == frames[0][0, -1].tolist()


def test_threaded_decoding_gives_the_same_frames(cases):
    data = cases["h264_bframes"].data
    np.testing.assert_array_equal(decode_frames(data, range(12), threads=0), decode_frames(data, range(12)))


def test_too_few_frames_says_frames_needed(cases):
    with pytest.raises(DecodeError, match="frames needed"):
        decode_frames(cases["h264"].data, [0, 12])


@pytest.mark.parametrize("mangle", ["garbage", "truncated", "empty", "header_only"])
def test_undecodable_bytes_raise_decode_error(cases, mangle):
    data = cases["h264"].data
    bad = {
        "garbage": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "header_only": data[:64],
    }[mangle]
    with pytest.raises(DecodeError):
        decode_frames(bad, [0])
    with pytest.raises(DecodeError):
        probe(bad)


def test_a_file_without_video_raises_decode_error():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = 16000, 0
        container.mux(stream.encode(chunk))
        container.mux(stream.encode())
    with pytest.raises(DecodeError, match="no video stream"):
        decode_frames(buffer.getvalue(), [0])


@pytest.mark.parametrize("indices", [[], [-1], [0.5]])
def test_bad_indices_are_a_caller_error(cases, indices):
    with pytest.raises(ValueError):
        decode_frames(cases["h264"].data, indices)


def test_backend_choice(cases, monkeypatch):
    data = cases["h264"].data
    with pytest.raises(ValueError, match="backend"):
        decode_frames(data, [0], backend="opencv")
    monkeypatch.setenv(video.BACKEND_ENV, "opencv")
    with pytest.raises(ValueError, match="backend"):
        decode_frames(data, [0])
    monkeypatch.setenv(video.BACKEND_ENV, "pyav")
    assert decode_frames(data, [0]).shape == (1, 48, 64, 3)


def test_torchcodec_requested_but_missing_is_a_clear_error(cases, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # makes the import fail
    with pytest.raises(ImportError, match="torchcodec"):
        decode_frames(cases["h264"].data, [0], backend="torchcodec")


def torchcodec_works() -> bool:
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # not installed, or no system FFmpeg for it (a RuntimeError)
        return False
    return True


@pytest.mark.skipif(not torchcodec_works(), reason="torchcodec (0.13, with system FFmpeg) is not installed")
@pytest.mark.parametrize("name", ["h264_bframes", "h264_with_aac_audio", "h264_variable_frame_rate", "rotated_-90"])
def test_torchcodec_gives_the_frames_pyav_gives(cases, name):
    data = cases[name].data
    indices = [4, 0, 0, 7]
    torchcodec_frames = decode_frames(data, indices, backend="torchcodec")
    assert torchcodec_frames.shape == (4, *cases[name].upright.shape[1:])
    assert mean_abs_error(torchcodec_frames, decode_frames(data, indices)) < 1.0
    with pytest.raises(DecodeError, match="frames needed"):
        decode_frames(data, [0, 50], backend="torchcodec")
