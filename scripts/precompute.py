"""Encode a dataset's shards once into a latent cache, which training then reads instead of decoding and encoding
every clip on every step (the format and what a cache keeps: vdm/data/cache.py).

    python scripts/precompute.py --out CACHE [--views 1] [--dtype bfloat16|float16|float32] [--batch-size 8]
                                 [--processes N] [--device cpu|cuda] [--json report.json] [key=value ...]
    python train.py data.cache=CACHE [the same key=value ...]

The key=value arguments are train.py's, composed the same way: the data (`data.num_frames=17`, `data.buckets=...`),
the autoencoder (`autoencoder=wan autoencoder.path=...`) and the text encoder (`text=t5_xxl text.path=...`) are
the ones the cache is made with, and training from it checks that its own are the same (a difference stops it,
naming what differs). `--views V` keeps V crops of each training clip (view 0 from the first frame, centred; the
others at random starts and crops); the held-out shards keep view 0.

Work is by shard, one cache shard per source shard: run it again after a kill or a preemption and it goes on with
the shards not done. `--processes N` runs N processes on this machine; under Slurm (`srun python scripts/
precompute.py ...`) every task takes its share (SLURM_PROCID of SLURM_NTASKS; or RANK of WORLD_SIZE), each on its
own GPU where there is one. It prints a progress bar, and at the end the cache's report: clips, skipped by reason,
bytes per clip, and this run's clips/s and seconds per clip.
"""

from __future__ import annotations

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

# isort: split
import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from vdm.command_line import build, compose_config
from vdm.config_check import ConfigError, check_config
from vdm.data.cache import DTYPES, Cache, StaleCache
from vdm.latent_cache import Precompute, cache_key, plan, start_cache

SECTIONS = ("text", "autoencoder", "data")


def rank_and_world(args) -> tuple[int, int]:
    if args.rank is not None:
        return args.rank, args.world_size
    for rank, world in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def device_for(choice: str | None) -> torch.device:
    if choice is not None:
        return torch.device(choice)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def build_parts(overrides: list[str]):
    """(config, data read from its source shards, autoencoder, text encoder), built as train.py builds them."""
    config = compose_config(overrides)
    config["data"]["cache"] = None  # the cache is what this makes; --out says where
    check_config({k: config[k] for k in SECTIONS})
    torch.manual_seed(config["seed"])
    text_encoder = build(config, "text")
    autoencoder = build(config, "autoencoder")
    data = build(config, "data")
    for index, bucket in enumerate(data.bucket_list):
        try:
            autoencoder.latent_shape(bucket.frames, bucket.height, bucket.width)
        except ValueError as error:
            shape = f"{bucket.frames}x{bucket.height}x{bucket.width}"
            raise ConfigError(f"data: bucket {index} ({shape}): {error}") from None
    return config, data, autoencoder, text_encoder


def precompute(args) -> dict:
    """This process's share of the cache; the report of the run (of the whole cache, once it is complete)."""
    rank, world = rank_and_world(args)
    config, data, autoencoder, text_encoder = build_parts(args.overrides)
    key = cache_key(data, config["autoencoder"], autoencoder, config["text"], text_encoder)
    root = Path(args.out)
    cache = start_cache(root, key, args.views, args.dtype)
    jobs = plan(data, root, args.views)[rank::world]
    progress = make_progress(args.progress and rank == 0, len(jobs))
    worker = Precompute(
        data,
        autoencoder,
        text_encoder,
        cache,
        batch_size=args.batch_size,
        device=device_for(args.device),
        on_clip=progress.update,
    )
    start = time.perf_counter()
    done = worker.run(jobs)
    progress.close()
    return report(Cache(root, cache.manifest), len(done), sum(r["clips"] for r in done), time.perf_counter() - start)


def make_progress(enabled: bool, shards: int):
    from tqdm import tqdm

    # in a log file (a Slurm job's), a line every 30 s rather than a redrawn bar
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(unit="clip", desc=f"encoding {shards} shards", disable=not enabled, mininterval=interval)


def report(cache: Cache, shards_run: int, ran: int, seconds: float) -> dict:
    """The whole cache's figures (of the shards done so far), and this run's: `shards_run` shards, `ran` clips."""
    reports = cache.reports()
    skipped = Counter()
    for shard in reports:
        skipped.update(shard["skipped"])
    clips, size = sum(r["clips"] for r in reports), sum(r["bytes"] for r in reports)
    return {
        "cache": str(cache.root),
        "shards": len(cache.all_shards()),
        "shards_done": len(reports),
        "complete": not cache.missing(),
        "clips": clips,
        "skipped": dict(skipped),
        "bytes_per_clip": size / clips if clips else 0.0,
        "views": cache.manifest["views"],
        "dtype": cache.manifest["dtype"],
        "this_run": {
            "shards": shards_run,
            "clips": ran,
            "seconds": seconds,
            "clips_per_second": ran / seconds if seconds > 0 else 0.0,
            "seconds_per_clip": seconds / ran if ran else 0.0,
        },
    }


def describe(summary: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    run = summary["this_run"]
    state = "complete" if summary["complete"] else f"{summary['shards_done']} of {summary['shards']} shards done"
    return "\n".join(
        [
            f"latent cache {summary['cache']}: {state}; {summary['clips']} clips ({summary['views']} view(s), "
            f"{summary['dtype']}), {summary['bytes_per_clip'] / 1024:.1f} KiB per clip; skipped: {skipped}",
            f"this run: {run['shards']} shards, {run['clips']} clips in {run['seconds']:.1f} s: "
            f"{run['clips_per_second']:.2f} clips/s, {1000 * run['seconds_per_clip']:.1f} ms per clip",
        ]
    )


def run_processes(args) -> dict:
    """--processes N: N copies of this command, one rank each; the report once all are done."""
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    command = [sys.executable, __file__, "--out", args.out, "--views", str(args.views), "--dtype", args.dtype]
    command += ["--batch-size", str(args.batch_size), "--world-size", str(args.processes)]
    command += ["--device", args.device] if args.device else []
    start = time.perf_counter()
    children, reports = [], [Path(args.out) / f".rank-{rank}.json" for rank in range(args.processes)]
    for rank, path in enumerate(reports):
        flags = ["--rank", str(rank), "--json", str(path)] + ([] if rank == 0 and args.progress else ["--no-progress"])
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "LOCAL_RANK": str(rank)}  # LOCAL_RANK: its GPU
        children.append(subprocess.Popen([*command, *flags, "--", *args.overrides], env=env))
    codes = [child.wait() for child in children]
    if any(codes):
        raise SystemExit(f"precompute: the processes exited with {codes}")
    runs = [json.loads(path.read_text())["this_run"] for path in reports]
    for path in reports:
        path.unlink()
    shards, clips = sum(r["shards"] for r in runs), sum(r["clips"] for r in runs)
    return report(Cache.open(args.out), shards, clips, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the cache folder (train with data.cache=<it>)")
    parser.add_argument("--views", type=int, default=1, help="crops kept per training clip (view 0: centred)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per autoencoder and text-encoder call")
    parser.add_argument("--processes", type=int, default=1, help="local processes, each taking every N-th shard")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: this rank's GPU where there is one, else cpu")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("overrides", nargs="*", help="train.py's key=value overrides")
    args = parser.parse_args(argv)
    if args.views < 1:
        parser.error("--views must be >= 1")
    if args.processes < 1 or not 0 <= (args.rank or 0) < args.world_size:
        parser.error("--processes must be >= 1 and --rank in [0, --world-size)")
    summary = run_processes(args) if args.processes > 1 else precompute(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    if args.rank is None or args.rank == 0:
        print(describe(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, StaleCache) as error:
        print(f"{'config error' if isinstance(error, ConfigError) else 'precompute'}: {error}", file=sys.stderr)
        sys.exit(2)
