"""The bundled dataset: rebuilt bit-for-bit by its script, and readable by the pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vdm.data import VideoData

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "data" / "moving_digits"


def test_script_rebuilds_the_bundled_shard_bit_for_bit(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_moving_digits.py"),
            "--out",
            str(tmp_path),
            "--train-clips",
            "1024",
            "--eval-clips",
            "0",
        ],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "train-000000.tar.gz").read_bytes() == (BUNDLED / "train-000000.tar.gz").read_bytes()


def held_out_batches(num_frames: int) -> tuple[list, VideoData]:
    """The bundled held-out split, cut as the demo's config cuts it but for `num_frames`."""
    data = VideoData(
        str(BUNDLED / "train-000000.tar.gz"),
        eval_shards=str(BUNDLED / "eval-000000.tar.gz"),
        num_frames=num_frames,
        frame_stride=2,
        size=32,
        batch_size=64,
    )
    return list(data.eval_loader()), data


def test_held_out_split_decodes_fully_with_captions_matching_metadata():
    batches, data = held_out_batches(num_frames=8)
    assert sum(len(b) for b in batches) == 512
    assert data.skips.total() == 0
    captions = [c for b in batches for c in b.captions]
    assert all(c.startswith("the digit ") and " moves " in c for c in captions)
    assert {c.split()[2] for c in captions} == {str(d) for d in range(10)}


def test_image_training_takes_one_frame_of_every_video():
    """data.num_frames=1 (experiment=image_pretrain): every video gives one frame, nothing is skipped as too
    short."""
    batches, data = held_out_batches(num_frames=1)
    assert sum(len(b) for b in batches) == 512 and data.skips.total() == 0
    assert all(b.video.shape[2] == 1 for b in batches)
