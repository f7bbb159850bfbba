"""`python -m vdm.data.inspect`: what the pipeline makes of shards; a failing status when nothing decodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vdm.data.shard_writer import write_shard

ROOT = Path(__file__).resolve().parents[2]


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vdm.data.inspect", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_reports_decoded_skipped_and_shapes(tmp_path):
    eval_shard = ROOT / "data" / "moving_digits" / "eval-000000.tar.gz"
    broken = tmp_path / "broken.tar"
    write_shard(broken, [("bad", {"mp4": b"\x00" * 64, "txt": b"not a video"}), ("nocap", {"mp4": b"x"})])
    # a brace pattern and a plain path, as a shell glob hands them over: any number of either
    result = inspect(
        f"{eval_shard.parent}/eval-{{000000..000000}}.tar.gz",
        str(broken),
        "--num-frames",
        "4",
        "--frame-stride",
        "2",
        "--size",
        "16",
    )
    assert result.returncode == 0, result.stderr
    assert "decoded 512 clips" in result.stdout
    assert "skipped 2: decode_error 1, missing_caption 1" in result.stdout
    assert "[3, 4, 16, 16] x512" in result.stdout


def test_training_stream_from_a_config_stops_at_the_limit():
    result = inspect("--config", "conf/data/moving_digits.yaml", "--train", "--limit", "64")
    assert result.returncode == 0, result.stderr
    assert "decoded 64 clips" in result.stdout and "[3, 8, 32, 32] x64" in result.stdout


def test_nothing_decoded_fails(tmp_path):
    broken = tmp_path / "broken.tar"
    write_shard(broken, [("bad", {"mp4": b"\x00" * 64, "txt": b"not a video"})])
    result = inspect(str(broken))
    assert result.returncode == 1
    assert "nothing decoded" in result.stderr
