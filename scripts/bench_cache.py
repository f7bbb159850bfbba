"""What a latent cache buys: training clips/s from the cache against on the fly, and the precompute's time per clip.

    python scripts/bench_cache.py [--clips 96] [--steps 40] [--repeats 2] [--json out.json] [key=value ...]

The key=value arguments are train.py's (default `autoencoder=kl_tiny`: the tiny preset in a small random VAE's
latent space; e.g. `autoencoder=wan_tiny data.num_frames=9 data.frame_stride=1`). It copies `--clips` clips of each
bundled training shard (data/moving_digits) into a temporary folder, makes their cache with scripts/precompute.py
(timed: clips/s and ms per clip), then runs `python train.py` for `--steps` steps on the fly and from the cache,
alternately, `--repeats` times each, and reads clips/s from each run's metrics.csv (the throughput rows after the
first, which holds the start-up). It prints the medians and their ratio, cached / on the fly, measured in the same
run (these machines are noisy: read the ratio, not the absolute figures).
"""

from __future__ import annotations

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

# isort: split
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vdm.data.shard_writer import write_shard
from vdm.data.shards import iter_shard_samples

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "moving_digits"


def copy_shards(out: Path, clips: int) -> list[str]:
    """data.* overrides for the first `clips` clips of each bundled training shard (and 8 held-out ones)."""
    for index in range(4):
        samples = iter_shard_samples(str(BUNDLED / f"train-{index:06d}.tar.gz"))
        write_shard(out / f"train-{index:06d}.tar", [members(next(samples)) for _ in range(clips)])
    samples = iter_shard_samples(str(BUNDLED / "eval-000000.tar.gz"))
    write_shard(out / "eval-000000.tar", [members(next(samples)) for _ in range(8)])
    return [f"data.train_shards='{out}/train-{{000000..000003}}.tar'", f"data.eval_shards={out}/eval-000000.tar"]


def members(sample: dict) -> tuple[str, dict]:
    return sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def train_clips_per_second(root: Path, name: str, steps: int, overrides: list[str]) -> float:
    """Median clips/s of a train.py run's throughput rows after the first."""
    args = [
        *(f"name={name}", f"run_root={root}", "logger=none", "evaluation=none", "trainer.progress_bar=false"),
        *(f"trainer.max_steps={steps}", "trainer.log_every_n_steps=5", "trainer.checkpoint_every_n_steps=0"),
        *("trainer.eval_every_n_steps=0", "data.eval_shards=null"),
        *overrides,
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=environment(), capture_output=True, text=True
    )
    if result.returncode:
        raise SystemExit(f"train.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    with open(root / name / "metrics.csv", newline="") as file:
        rates = [float(row["clips_per_sec"]) for row in csv.DictReader(file) if row.get("clips_per_sec")]
    if len(rates) < 2:
        raise SystemExit(f"{name}: {len(rates)} throughput rows; raise --steps")
    return statistics.median(rates[1:])


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=96, help="clips copied from each of the 4 training shards")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args(argv)
    overrides = args.overrides or ["autoencoder=kl_tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        data = copy_shards(tmp / "shards", args.clips)
        start = time.perf_counter()
        report = tmp / "precompute.json"
        command = [sys.executable, "scripts/precompute.py", "--out", str(tmp / "cache"), "--no-progress"]
        subprocess.run([*command, "--json", str(report), *data, *overrides], cwd=ROOT, env=environment(), check=True)
        seconds = time.perf_counter() - start
        made = json.loads(report.read_text())
        fly, cached = [], []
        for repeat in range(args.repeats):  # alternated: a slow spell of the machine hits both
            fly.append(train_clips_per_second(tmp / "runs", f"fly-{repeat}", args.steps, [*data, *overrides]))
            cache = [*data, *overrides, f"data.cache={tmp / 'cache'}"]
            cached.append(train_clips_per_second(tmp / "runs", f"cached-{repeat}", args.steps, cache))
    figures = {
        "overrides": overrides,
        "precompute": {
            "clips": made["clips"],
            "seconds": seconds,  # the whole command: building the models too
            "clips_per_second": made["this_run"]["clips_per_second"],
            "ms_per_clip": 1000 * made["this_run"]["seconds_per_clip"],
            "bytes_per_clip": made["bytes_per_clip"],
        },
        "train_clips_per_second": {"on_the_fly": fly, "cached": cached},
        "cached_over_on_the_fly": statistics.median(cached) / statistics.median(fly),
    }
    pre = figures["precompute"]
    print(
        f"precompute ({' '.join(overrides)}): {pre['clips']} clips, {pre['clips_per_second']:.1f} clips/s, "
        f"{pre['ms_per_clip']:.1f} ms per clip, {pre['bytes_per_clip'] / 1024:.1f} KiB per clip"
    )
    rates = {
        name: f"{statistics.median(r):.1f} ({', '.join(f'{x:.1f}' for x in r)})"
        for name, r in (("fly", fly), ("cached", cached))
    }
    print(
        f"training clips/s: on the fly {rates['fly']}, from the cache {rates['cached']}; "
        f"cached / on the fly = {figures['cached_over_on_the_fly']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
