"""Stream shards through the pipeline as training would, and report what comes out.

    python -m vdm.data.inspect 'data/moving_digits/train-{000000..000003}.tar.gz'
    python -m vdm.data.inspect shards/*.tar extra/shard-000000.tar        # any number of paths or patterns
    python -m vdm.data.inspect --config conf/data/moving_digits.yaml --train --limit 512

Prints the samples decoded and skipped (by reason), the clip shapes (buckets) seen, and clips per second.
Exits with status 1 when nothing decodes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from vdm.data.source import VideoData


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vdm.data.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "shards", nargs="*", help="shard paths or brace patterns, any number (else the config's train_shards)"
    )
    parser.add_argument("--config", type=Path, help="a data config (conf/data/*.yaml): inspect exactly that pipeline")
    parser.add_argument(
        "--train",
        action="store_true",
        help="the training stream (shuffled, random crops, endless; stops at --limit) instead of one plain pass",
    )
    parser.add_argument("--limit", type=int, default=0, help="stop after this many clips (0: the whole pass)")
    for name, kind in (
        ("num_frames", int),
        ("frame_stride", int),
        ("fps", float),
        ("size", int),
        ("batch_size", int),
        ("num_workers", int),
        ("image_batch_size", int),
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    return parser.parse_args(argv)


def build_data(args: argparse.Namespace) -> VideoData:
    settings = {}
    if args.config:
        settings = {k: v for k, v in yaml.safe_load(args.config.read_text()).items() if not k.startswith("_")}
    if args.shards:  # one pattern, or the paths a shell glob expanded to
        shards = args.shards[0] if len(args.shards) == 1 else list(args.shards)
        settings |= {"train_shards": shards, "sources": None, "eval_shards": None}
    if not settings.get("train_shards") and not settings.get("sources"):
        raise SystemExit("give shards, or a --config with train_shards or sources")
    settings |= {
        k: v
        for k in ("num_frames", "frame_stride", "fps", "size", "batch_size", "num_workers", "image_batch_size")
        if (v := getattr(args, k)) is not None
    }
    return VideoData(**settings)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = build_data(args)
    if args.train:
        loader = data.train_loader(seed=0)
    else:  # one plain pass over the training shards, with the evaluation's centre crops
        shards = [shard for source in data.train_sources for shard in source.shards]
        data.eval_shard_list = shards
        loader = data.eval_loader(num_workers=data.num_workers)
    shapes: Counter = Counter()
    clips, start = 0, time.perf_counter()
    for batch in loader:
        shapes[tuple(batch.video.shape[1:])] += len(batch)
        clips += len(batch)
        if args.limit and clips >= args.limit:
            break
    seconds = time.perf_counter() - start
    skipped = data.skips.counts()
    print(
        f"decoded {clips} clips in {seconds:.1f} s: {clips / max(seconds, 1e-9):.1f} clips/s "
        f"({max(data.num_workers, 1)} loader process{'es' if data.num_workers > 1 else ''})"
    )
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items() if count)
    print(f"skipped {sum(skipped.values())}" + (f": {reasons}" if reasons else ""))
    print("clip shapes (C, T, H, W): " + ", ".join(f"{list(shape)} x{n}" for shape, n in sorted(shapes.items())))
    if clips == 0:
        print("nothing decoded: check the shard paths, the captions and the video files", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
