"""Digit and motion accuracy of Moving Digits videos (vdm/evaluation/moving_digits.py says what they mean).

    python scripts/eval_moving_digits.py --calibrate [--shards data/moving_digits/eval-000000.tar.gz]
                                         [--frames 8] [--frame-stride 2] [--size 32] [--seed 0]
    python scripts/eval_moving_digits.py --samples DIR

--calibrate scores the real held-out clips against their own captions (a sound evaluator reads them
nearly perfectly) and against the same captions shuffled among the clips (it should read chance: 10%
digit, about 12.5% motion). The clips are cut as training samples them (conf/data/moving_digits.yaml:
8 frames, every 2nd, 32 x 32), from the first frame.

--samples scores what scripts/sample.py wrote: DIR/prompts.txt and DIR/<index>.mp4 in prompt order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from vdm.data import VideoData
from vdm.data.video import decode_frames, probe
from vdm.evaluation.moving_digits import score

ROOT = Path(__file__).resolve().parents[1]


def held_out_clips(shards: str, frames: int, frame_stride: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Every clip of `shards`: (N, C, T, H, W) uint8 and N captions."""
    # train_shards is required by VideoData but never read here
    data = VideoData(shards, eval_shards=shards, num_frames=frames, frame_stride=frame_stride, size=size)
    batches = list(data.eval_loader())
    return torch.cat([b.video for b in batches]), [c for b in batches for c in b.captions]


def calibrate(videos: torch.Tensor, captions: list[str], seed: int) -> dict[str, dict[str, float]]:
    shuffled = [captions[i] for i in np.random.default_rng(seed).permutation(len(captions))]
    return {"real": score(videos, captions), "shuffled": score(videos, shuffled)}


def sample_folder(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """scripts/sample.py's output -> (N, C, T, H, W) uint8 and N prompts."""
    prompts = (folder / "prompts.txt").read_text().splitlines()
    clips = []
    for index in range(len(prompts)):
        data = (folder / f"{index:03d}.mp4").read_bytes()
        frames = decode_frames(data, range(probe(data).num_frames))  # (T, H, W, 3)
        clips.append(torch.from_numpy(frames).permute(3, 0, 1, 2))
    return torch.stack(clips), prompts


def percent(figures: dict[str, float]) -> str:
    return (
        f"digit {100 * figures['digit_acc']:5.1f}%   motion {100 * figures['motion_acc']:5.1f}%   "
        f"consistency {100 * figures['consistency']:5.1f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--calibrate", action="store_true", help="score real held-out clips, and shuffled")
    task.add_argument("--samples", type=Path, help="a folder scripts/sample.py wrote")
    parser.add_argument("--shards", default=str(ROOT / "data" / "moving_digits" / "eval-000000.tar.gz"))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--frame-stride", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of the captions")
    args = parser.parse_args(argv)

    if args.samples is not None:
        videos, prompts = sample_folder(args.samples)
        print(f"{len(prompts)} generated clips in {args.samples}: {percent(score(videos, prompts))}")
        return 0
    videos, captions = held_out_clips(args.shards, args.frames, args.frame_stride, args.size)
    figures = calibrate(videos, captions, args.seed)
    shape = f"{len(captions)} clips of {args.frames} frames (stride {args.frame_stride}, {args.size} px)"
    print(f"real held-out clips, {shape}:  {percent(figures['real'])}")
    print(f"same clips, shuffled captions (chance: 10% digit, ~12.5% motion):  {percent(figures['shuffled'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
