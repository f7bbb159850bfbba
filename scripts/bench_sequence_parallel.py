"""Activation memory per rank and step time of sequence parallelism (vdm/distributed/sequence.py) against SP size.

    python scripts/bench_sequence_parallel.py [--sizes 1 2 4] [--repeats 5] [--json out.json] [key=value ...]

For each SP size N, N processes (gloo on CPU; nccl, one GPU each, on CUDA) build the same SpaceTimeDiT (a preset
of conf/model, dit_tiny by default, with key=value overrides of its fields) and run forward + loss + backward of
one clip batch split by frames over the N ranks, as training does (no optimizer step, no data-parallel
all-reduce: only what SP changes). N=1 is one process with no split, the baseline, measured in the same run.
Per rank:

- activation memory: the bytes of the tensors autograd saves for backward (saved_tensors_hooks, unique storages,
  parameters excluded), the memory that grows with tokens; on CUDA also torch.cuda.max_memory_allocated over the
  step less the memory before it; on CPU the growth of the process's peak RSS over its first step (coarse: it
  includes the allocator's and the one-time buffers').
- step time: the median over --repeats steps after the measured one and a warm-up step, the slowest rank's.
- collectives: the time spent inside the all-to-alls and the output gather (all_to_all_single and all_gather,
  timed where sequence.py calls them, and the bytes each rank hands them a step); the time includes waiting
  for the slower rank of the group.

On CPU each process runs one intra-op thread (--threads), a core a rank as a GPU a rank: with N free cores,
SP=1's step time / N is the ideal of an N-way split and the step time above it is SP's overhead (with fewer free
cores than N ranks, or a loaded machine, the step times say little; the memory and the bytes still hold). Run
fields that are not model fields: batch (clips), frames (latent frames), size (latent height = width),
text_len (caption tokens). Defaults: dit_tiny at batch=1 frames=32 size=32, 32 x 64 = 2048 tokens a clip.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = {"batch": 1, "frames": 32, "size": 32, "text_len": 16}
IN_CHANNELS, TEXT_DIM = 4, 64


def parse_overrides(pairs: list[str], preset: str) -> tuple[dict, dict]:
    model = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())
    model.pop("_target_")
    run = dict(RUN_FIELDS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"override {pair!r} is not key=value")
        target = run if key in run else model
        if target is model and key not in model:
            raise SystemExit(f"{key!r} is neither a field of conf/model/{preset}.yaml nor one of {sorted(run)}")
        target[key] = yaml.safe_load(value)
    return model, run


class TimedDist:
    """torch.distributed as sequence.py sees it, with its two collectives timed (everything else passes through)."""

    def __init__(self, sync):
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0  # sent by this rank, its own block included
        self.sync = sync

    def _timed(self, fn, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def all_to_all_single(self, out, blocks, **kwargs):
        self.bytes += blocks.nbytes
        return self._timed(dist.all_to_all_single, out, blocks, **kwargs)

    def all_gather(self, parts, local, **kwargs):
        self.bytes += local.nbytes * len(parts)
        return self._timed(dist.all_gather, parts, local, **kwargs)

    def __getattr__(self, name):
        return getattr(dist, name)


class SavedBytes:
    """Bytes of the unique storages autograd saves for backward while active, parameters excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key:
            self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(rank: int, world: int, init_file: str, args, out_file: str) -> None:
    from vdm.distributed import sequence
    from vdm.models.dit import SpaceTimeDiT
    from vdm.types import TextCond

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        timed = TimedDist(sync)
        sequence.dist = timed  # only sequence.py's calls go through it
        model, run = args.model, args.run
        torch.manual_seed(0)
        net = SpaceTimeDiT(in_channels=IN_CHANNELS, text_dim=TEXT_DIM, **model).to(device)
        with torch.no_grad():  # vdm's zero init gates off branches; random weights make every branch count
            for param in net.parameters():
                param.normal_(0, 0.02)
        if world > 1:
            sequence.enable(net)
        g = torch.Generator().manual_seed(1)
        B, T, S, L = run["batch"], run["frames"], run["size"], run["text_len"]
        x = torch.randn(B, IN_CHANNELS, T, S, S, generator=g).to(device)
        t = torch.rand(B, generator=g).to(device)
        cond = TextCond(
            torch.randn(B, L, TEXT_DIM, generator=g), torch.ones(B, L, dtype=torch.bool), torch.randn(B, TEXT_DIM)
        ).to(device)
        target = torch.randn(x.shape, generator=g).to(device)
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}

        def step(saved: SavedBytes | None = None) -> float:
            net.zero_grad(set_to_none=True)
            dist.barrier()
            sync()
            start = time.perf_counter()
            if saved is None:
                loss = ((net(x, t, cond) - target) ** 2).mean()
            else:
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
                    loss = ((net(x, t, cond) - target) ** 2).mean()
            loss.backward()
            sync()
            return time.perf_counter() - start

        rss_before = rss_bytes()  # the first step: the process's peak RSS has not yet seen any
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        saved = SavedBytes(params)
        step(saved)
        peak = torch.cuda.max_memory_allocated() - base if cuda else None
        rss_growth = rss_bytes() - rss_before
        step()  # warm-up for the timed steps
        timed.seconds, timed.calls, timed.bytes = 0.0, 0, 0
        times = [step() for _ in range(args.repeats)]
        result = {
            "rank": rank,
            "saved_bytes": saved.total,
            "peak_alloc_bytes": peak,
            "rss_growth_bytes": rss_growth,
            "step_s": statistics.median(times),
            "collective_s": timed.seconds / args.repeats,
            "collective_calls": timed.calls // args.repeats,
            "collective_bytes": timed.bytes // args.repeats,
        }
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out_file).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def bench(size: int, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        init, out = os.path.join(folder, "init"), os.path.join(folder, "out.json")
        mp.spawn(worker, args=(size, init, args, out), nprocs=size, join=True)
        ranks = json.loads(Path(out).read_text())
    slowest = max(ranks, key=lambda r: r["step_s"])
    peaks = [r["peak_alloc_bytes"] for r in ranks if r["peak_alloc_bytes"] is not None]
    return {
        "sp": size,
        "saved_MB": max(r["saved_bytes"] for r in ranks) / 2**20,
        "peak_alloc_MB": max(peaks) / 2**20 if peaks else None,
        "rss_growth_MB": max(r["rss_growth_bytes"] for r in ranks) / 2**20,
        "step_s": slowest["step_s"],
        "collective_s": max(r["collective_s"] for r in ranks),
        "collective_calls": ranks[0]["collective_calls"],
        "collective_MB": ranks[0]["collective_bytes"] / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="model fields or batch/frames/size/text_len, key=value")
    parser.add_argument("--preset", default="dit_tiny")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process on CPU")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even when CUDA is there")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.model, args.run = parse_overrides(args.overrides, args.preset)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cuda = torch.cuda.is_available() and not args.cpu
    if 1 not in args.sizes:
        args.sizes = [1, *args.sizes]
    if cuda and max(args.sizes) > torch.cuda.device_count():
        skipped = [s for s in args.sizes if s > torch.cuda.device_count()]
        print(f"skipping SP sizes {skipped}: {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
        args.sizes = [s for s in args.sizes if s <= torch.cuda.device_count()]
    run = args.run
    tokens = run["frames"] // args.model["patch_size"][0] * (run["size"] // args.model["patch_size"][1]) ** 2
    print(
        f"{args.preset} {args.overrides or ''} batch={run['batch']} latent {run['frames']}x{run['size']}x{run['size']}"
        f" ({tokens} tokens a clip), {'cuda/nccl' if cuda else 'cpu/gloo'}, median of {args.repeats} steps"
    )
    results = [bench(size, args) for size in sorted(set(args.sizes))]
    base = results[0]
    mem = "peak_alloc_MB" if cuda else "rss_growth_MB"
    print(
        f"{'SP':>3} {'saved MB/rank':>14} {'x SP=1':>7} {mem:>14} {'step s':>8} {'x SP=1':>7} "
        f"{'ideal s':>8} {'overhead':>9} {'coll. s':>8} {'coll. %':>8} {'coll. MB':>9} {'calls':>6}"
    )
    for r in results:
        r["saved_vs_sp1"] = r["saved_MB"] / base["saved_MB"]
        r["step_vs_sp1"] = r["step_s"] / base["step_s"]
        r["ideal_s"] = base["step_s"] / r["sp"]  # SP=1's compute split N ways on the same cores
        r["overhead_vs_ideal"] = r["step_s"] / r["ideal_s"] - 1
        r["collective_share"] = r["collective_s"] / r["step_s"]
        print(
            f"{r['sp']:>3} {r['saved_MB']:>14.1f} {r['saved_vs_sp1']:>7.2f} {r[mem] or 0:>14.1f} {r['step_s']:>8.3f} "
            f"{r['step_vs_sp1']:>7.2f} {r['ideal_s']:>8.3f} {r['overhead_vs_ideal']:>+9.0%} {r['collective_s']:>8.3f} "
            f"{r['collective_share']:>8.0%} {r['collective_MB']:>9.1f} {r['collective_calls']:>6}",
            flush=True,
        )
    if args.json:
        payload = {"preset": args.preset, "model": args.model, "run": run, "cuda": cuda, "results": results}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
