"""Build the bundled "Moving Digits" dataset: real handwritten digits moving across a small canvas.

The digits are the 1,797 8x8 scans that scikit-learn ships (no download). Each clip upscales one digit
and moves it in one of 8 directions; some clips bounce off a wall half way. Captions say what happens:
"the digit 7 moves up and to the left". Held-out clips use digit scans that no training clip uses.

The output is a pure function of the arguments: rerunning rebuilds the shards bit-for-bit.

    python scripts/make_moving_digits.py --out data/moving_digits
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from vdm.data.shard_writer import write_shard
from vdm.data.video import encode_mp4

# (dy, dx) per direction, in image coordinates (y grows downwards)
DIRECTIONS = {
    "up": (-1, 0),
    "down": (1, 0),
    "left": (0, -1),
    "right": (0, 1),
    "up and to the left": (-1, -1),
    "up and to the right": (-1, 1),
    "down and to the left": (1, -1),
    "down and to the right": (1, 1),
}


def path_offsets(velocity: tuple[int, int], bounce_at: int | None, num_frames: int) -> np.ndarray:
    """(T, 2) positions relative to the start: one step of `velocity` per frame, reversed from `bounce_at` on."""
    steps = np.array(
        [
            velocity if (bounce_at is None or i < bounce_at) else (-velocity[0], -velocity[1])
            for i in range(1, num_frames)
        ]
    ).reshape(-1, 2)
    return np.concatenate([np.zeros((1, 2), dtype=int), np.cumsum(steps, axis=0)])


def plan_path(
    rng: np.random.Generator, velocity: tuple[int, int], bounces: bool, num_frames: int, room: int
) -> np.ndarray:
    """(T, 2) top-left corners of the digit such that it stays on the canvas (room = canvas - digit size)."""
    bounce_at = int(rng.integers(num_frames // 3, 2 * num_frames // 3)) if bounces else None
    offsets = path_offsets(velocity, bounce_at, num_frames)
    low, high = -offsets.min(axis=0), room - offsets.max(axis=0)
    if (low > high).any():
        raise ValueError(f"a clip of {num_frames} frames does not fit in the canvas")
    start = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
    return start + offsets


def render_clip(digit: np.ndarray, corners: np.ndarray, canvas: int) -> np.ndarray:
    """One clip (T, H, W, 3) uint8: `digit` (h, w) uint8 pasted with its top-left corner at `corners` (T, 2)."""
    size = digit.shape[0]
    frames = np.zeros((len(corners), canvas, canvas, 3), dtype=np.uint8)
    for frame, (y, x) in zip(frames, corners):
        frame[y : y + size, x : x + size] = digit[:, :, None]
    return frames


def make_sample(rng: np.random.Generator, image: np.ndarray, label: int, source_index: int, args) -> dict[str, bytes]:
    digit = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((args.digit_size,) * 2, Image.BILINEAR)
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    bounces = bool(rng.random() < args.bounce_fraction)
    velocity = DIRECTIONS[direction]
    corners = plan_path(rng, velocity, bounces, args.frames, args.canvas - args.digit_size)
    frames = render_clip(np.asarray(digit), corners, args.canvas)
    caption = f"the digit {label} moves {direction}" + (" and bounces back" if bounces else "")
    meta = {
        "digit": label,
        "direction": direction,
        "bounces": bounces,
        "fps": args.fps,
        "frames": args.frames,
        "width": args.canvas,
        "height": args.canvas,
        "duration": args.frames / args.fps,
        "source": f"sklearn-digits/{source_index}",
    }
    return {
        "mp4": encode_mp4(frames, args.fps, qp=args.qp),
        "txt": caption.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def pick(digits, pool: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """A random digit scan from `pool`: (image, label, index among sklearn's digits)."""
    source = int(pool[rng.integers(len(pool))])
    return digits.images[source], int(digits.target[source]), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/moving_digits"))
    parser.add_argument("--train-clips", type=int, default=4096)
    parser.add_argument("--eval-clips", type=int, default=512)
    parser.add_argument("--clips-per-shard", type=int, default=1024)
    parser.add_argument("--eval-digits", type=int, default=297, help="digit scans kept for the held-out split")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--digit-size", type=int, default=14)
    parser.add_argument("--bounce-fraction", type=float, default=0.25)
    parser.add_argument("--qp", type=int, default=20, help="H.264 quantizer (lower: larger, sharper)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.images))
    pools = {"eval": order[: args.eval_digits], "train": order[args.eval_digits :]}
    args.out.mkdir(parents=True, exist_ok=True)
    for split_index, (split, num_clips) in enumerate((("train", args.train_clips), ("eval", args.eval_clips))):
        rng = np.random.default_rng([args.seed, split_index])
        pool = pools[split]
        for shard_index, first in enumerate(range(0, num_clips, args.clips_per_shard)):
            keys = [f"{split}{clip:06d}" for clip in range(first, min(first + args.clips_per_shard, num_clips))]
            samples = ((key, make_sample(rng, *pick(digits, pool, rng), args)) for key in keys)
            path = args.out / f"{split}-{shard_index:06d}.tar.gz"
            count = write_shard(path, samples)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            print(f"{path}  {count} clips  {path.stat().st_size / 1e6:.2f} MB  sha256 {digest}")


if __name__ == "__main__":
    main()
