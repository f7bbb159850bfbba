"""scripts/make_shards.py: every usable file lands once, unchanged; shards are reproducible and resumable."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from scripts.make_shards import main
from vdm.data import VideoData
from vdm.data.video import encode_mp4

ROOT = Path(__file__).resolve().parents[2]
VIDEO_CAPTIONS = {"clips/a.mp4": "a bar moves right", "clips/b.mp4": "a bar moves, slowly", "c/d/e.mp4": "ünïcode bar"}
IMAGE_CAPTIONS = {"red.png": "a red square", "photos/green.JPEG": "a green square"}
USABLE = VIDEO_CAPTIONS | IMAGE_CAPTIONS
UNUSABLE = {"broken.mp4": "cannot decode video", "uncaptioned.mp4": "missing caption", "blank.mp4": "empty caption"}


def moving_bar(offset: int) -> np.ndarray:
    """8 frames of 32x32 with a bar that moves 3 pixels a frame, so consecutive frames differ."""
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    for t in range(8):
        frames[t, :, offset + 3 * t : offset + 3 * t + 4] = (255, 128 + 10 * t, 0)
    return frames


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A folder of captioned videos and images, plus a corrupt, an uncaptioned and a blank-captioned video."""
    root = tmp_path_factory.mktemp("media")
    for offset, source in enumerate(VIDEO_CAPTIONS):
        write(root / source, encode_mp4(moving_bar(offset), fps=8))
    write(root / "red.png", image_bytes((20, 10), "PNG"))
    write(root / "photos/green.JPEG", image_bytes((12, 14), "JPEG"))
    for source, caption in USABLE.items():
        write((root / source).with_suffix(".txt"), caption.encode() + b"\n")
    write(root / "broken.mp4", np.random.default_rng(0).bytes(3000))
    write(root / "broken.txt", b"noise")
    write(root / "uncaptioned.mp4", (root / "clips/a.mp4").read_bytes())
    write(root / "blank.mp4", (root / "clips/b.mp4").read_bytes())
    write(root / "blank.txt", b"  \n")
    return root


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def image_bytes(size: tuple[int, int], format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 200, 0)).save(buffer, format=format)
    return buffer.getvalue()


def run(*args) -> int:
    return main([str(a) for a in args])


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar*"))}


def read_samples(out: Path) -> list[dict[str, bytes]]:
    """All samples of all shards, in shard order, as {ext: bytes, '__key__', '__shard__'}."""
    samples: list[dict] = []
    for name, data in shard_files(out).items():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key, "__shard__": name})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def shard_pattern(out: Path) -> str:
    last = len(shard_files(out)) - 1
    return str(out / f"shard-{{000000..{last:06d}}}.tar")


def loaded_captions(shards: str) -> list[str]:
    data = VideoData(train_shards=shards, eval_shards=shards, num_frames=4, frame_stride=1, size=16, batch_size=2)
    captions = []
    for batch in data.eval_loader():
        if batch.video.shape[2] == 1:
            continue  # an image, should the pipeline read them: only the videos are checked here
        assert batch.video.shape[1:] == (3, 4, 16, 16)
        captions += batch.captions
    return sorted(captions)


def test_folder_input_writes_every_usable_file_once_unchanged_and_reports_the_rest(media, tmp_path):
    out = tmp_path / "out"
    assert run("--input", media, "--out", out, "--workers", 2) == 0

    samples = read_samples(out)
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert len(samples) == len(by_source) == len(USABLE)  # each exactly once
    assert sorted(by_source) == sorted(USABLE)
    for source, sample in by_source.items():
        extension = {".jpeg": "jpg"}.get(Path(source).suffix.lower(), Path(source).suffix.lower()[1:])
        assert sample["__key__"] == hashlib.sha1(source.encode()).hexdigest()[:16]
        assert sample[extension] == (media / source).read_bytes()  # copied, not re-encoded
        assert sample["txt"].decode() == USABLE[source]
        meta = json.loads(sample["json"])
        if source in VIDEO_CAPTIONS:
            expected = {"fps": 8, "frames": 8, "width": 32, "height": 32, "rotation": 0, "duration": 1.0}
            assert meta == expected | {"source": source}
    assert json.loads(by_source["red.png"]["json"]) == {"width": 20, "height": 10, "frames": 1, "source": "red.png"}
    green = {"width": 12, "height": 14, "frames": 1, "source": "photos/green.JPEG"}
    assert json.loads(by_source["photos/green.JPEG"]["json"]) == green  # and stored as .jpg (checked above)

    report = json.loads((out / "report.json").read_text())
    assert report["samples_written"] == report["samples_total"] == len(USABLE)
    assert (report["shards_written"], report["shards_skipped_complete"]) == (1, 0)
    assert {u["source"]: u["reason"].split(":")[0] for u in report["unusable"]} == UNUSABLE

    assert loaded_captions(shard_pattern(out)) == sorted(VIDEO_CAPTIONS.values())


def test_small_shards_are_contiguous_runs_of_the_sorted_inputs_and_reproducible(media, tmp_path):
    assert run("--input", media, "--out", tmp_path / "one", "--shard-size-mb", 0.005, "--workers", 1) == 0
    assert run("--input", media, "--out", tmp_path / "two", "--shard-size-mb", 0.005, "--workers", 2) == 0

    one, two = shard_files(tmp_path / "one"), shard_files(tmp_path / "two")
    assert one == two  # same names, same bytes, whatever the number of workers
    # two samples exceed 5 kB, so each captioned file was planned a shard of its own; the one that turned out
    # unreadable leaves its shard empty rather than moving the boundaries
    assert len(one) == len(USABLE) + 1
    samples = read_samples(tmp_path / "one")
    assert [json.loads(s["json"])["source"] for s in samples] == sorted(USABLE)  # in order, across the shards
    assert len({s["__shard__"] for s in samples}) == len(USABLE)


def test_resume_rewrites_only_the_missing_shard_and_gives_the_same_bytes(media, tmp_path):
    out = tmp_path / "out"
    args = ("--input", media, "--out", out, "--shard-size-mb", 0.005, "--workers", 2)
    assert run(*args) == 0
    clean = shard_files(out)
    first_report = json.loads((out / "report.json").read_text())
    missing = sorted(clean)[1]
    (out / missing).unlink()
    (out / (missing + ".partial")).write_bytes(b"half a shard from a run that was killed")
    kept = {name: (out / name).stat().st_mtime_ns for name in clean if name != missing}

    assert run(*args) == 0

    assert shard_files(out) == clean
    assert not list(out.glob("*.partial"))
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # untouched
    report = json.loads((out / "report.json").read_text())
    assert (report["shards_written"], report["shards_skipped_complete"]) == (1, len(clean) - 1)
    assert report["samples_total"] == len(USABLE)
    # the files found unusable in the shards kept are still listed, carried over from the first run
    assert report["unusable"] == first_report["unusable"]

    # other options plan other shards: refused rather than mixed with the ones there
    assert run("--input", media, "--out", out, "--shard-size-mb", 1) == 2
    assert shard_files(out) == clean


def test_csv_and_jsonl_captions_give_the_same_shards_as_the_folder(media, tmp_path):
    assert run("--input", media, "--out", tmp_path / "folder") == 0
    copy = Path(shutil.copytree(media, tmp_path / "media"))
    listed = {**USABLE, "no/such/file.mp4": "gone"}
    with open(copy / "captions.csv", "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows([("path", "caption"), *listed.items()])
    (copy / "captions.jsonl").write_text(
        "".join(json.dumps({"path": path, "caption": caption}) + "\n" for path, caption in listed.items())
    )
    # relative paths are relative to the caption file's own folder: from lists/, ../ reaches the media
    (copy / "lists").mkdir()
    (copy / "lists/captions.jsonl").write_text(
        "".join(json.dumps({"path": f"../{path}", "caption": caption}) + "\n" for path, caption in USABLE.items())
    )
    assert run("--captions", copy / "captions.csv", "--out", tmp_path / "csv") == 0
    assert run("--captions", copy / "captions.jsonl", "--out", tmp_path / "jsonl") == 0
    assert run("--captions", copy / "lists/captions.jsonl", "--out", tmp_path / "up") == 0

    folder = shard_files(tmp_path / "folder")
    assert shard_files(tmp_path / "csv") == folder  # same sources, so same keys and bytes
    assert shard_files(tmp_path / "jsonl") == folder
    up = {json.loads(s["json"])["source"]: s["txt"].decode() for s in read_samples(tmp_path / "up")}
    assert up == {f"../{path}": caption for path, caption in USABLE.items()}
    report = json.loads((tmp_path / "csv" / "report.json").read_text())
    assert report["unusable"] == [{"source": "no/such/file.mp4", "reason": "file not found", "shard": None}]


def test_a_shard_in_video2dataset_layout_reads_without_frames_or_fps(tmp_path):
    # video2dataset writes keys like 00000 and json without frames or fps: the pipeline probes the video
    captions = ["a bar moves right", "another bar moves right"]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for index, caption in enumerate(captions):
            key = f"{index:05d}"
            meta = {
                "url": f"https://example.com/{key}.mp4",
                "key": key,
                "status": "success",
                "caption": caption,
                "duration": 1.0,
                "width": 32,
                "height": 32,
            }
            members = {
                "mp4": encode_mp4(moving_bar(index), fps=8),
                "txt": caption.encode(),
                "json": json.dumps(meta).encode(),
            }
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    assert loaded_captions(str(shard)) == captions


def test_nothing_usable_exits_non_zero_with_a_clear_message(media, tmp_path):
    bad = tmp_path / "bad"
    write(bad / "broken.mp4", (media / "broken.mp4").read_bytes())
    write(bad / "broken.txt", b"noise")
    write(bad / "uncaptioned.mp4", (media / "clips/a.mp4").read_bytes())
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "scripts/make_shards.py", "--input", str(bad), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "no sample could be written: all 2 files are unusable" in result.stderr
    assert "broken.mp4: cannot decode video" in result.stdout and "uncaptioned.mp4: missing caption" in result.stdout
    assert not shard_files(out)


def test_a_rotated_phone_video_is_described_as_displayed_and_lands_in_the_portrait_bucket(tmp_path):
    """Stored 48x24 (landscape) with a 90 degree display rotation: it plays 24 wide and 48 high."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width = 24, 48
        stream.set_display_rotation(90)
        for t in range(8):
            frame = np.zeros((24, 48, 3), dtype=np.uint8)
            frame[:, 4 * t : 4 * t + 6] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    write(tmp_path / "in" / "phone.mp4", buffer.getvalue())
    write(tmp_path / "in" / "phone.txt", b"a phone video")
    assert run("--input", tmp_path / "in", "--out", tmp_path / "out") == 0
    (sample,) = read_samples(tmp_path / "out")
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"], meta["rotation"]) == (24, 48, 90)

    buckets = [
        {"frames": 4, "height": 16, "width": 32, "batch_size": 1},  # landscape
        {"frames": 4, "height": 32, "width": 16, "batch_size": 1},  # portrait: where it belongs
    ]
    shards = shard_pattern(tmp_path / "out")
    data = VideoData(train_shards=shards, eval_shards=shards, buckets=buckets, frame_stride=1)
    (batch,) = list(data.eval_loader())
    assert batch.video.shape[1:] == (3, 4, 32, 16)
