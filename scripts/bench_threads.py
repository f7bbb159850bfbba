"""Steps/s of training processes that share a node: torch's default threads against vdm's choice.

    python scripts/bench_threads.py [--processes 2] [--steps 60] [overrides ...]

Runs `train.py` with `trainer.devices=<processes>` on the CPU twice (or more, alternating, with --repeats):
once with every process at torch's default of one intra-op thread per core (what happened before vdm chose,
`trainer.threads_per_process=<cores>`), once with vdm's choice (vdm/distributed/threads.py). Prints steps/s
measured between the 10th step and the last from the moment each metrics.csv row appears (start-up and the
first steps excluded), and the ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = [
    "logger=none",
    "evaluation=none",
    "sampling.prompts=[]",
    "trainer.eval_every_n_steps=0",
    "trainer.checkpoint_every_n_steps=0",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
]


def last_step(run: Path) -> int:
    try:
        with open(run / "metrics.csv", newline="") as file:
            rows = [r for r in csv.DictReader(file) if r.get("train/loss")]
    except FileNotFoundError:
        return 0
    return int(rows[-1]["step"]) if rows else 0


def steps_per_second(root: Path, name: str, processes: int, steps: int, threads: int | None, extra: list[str]) -> float:
    args = [sys.executable, "train.py", f"run_root={root}", f"name={name}", f"trainer.devices={processes}"]
    args += [f"trainer.max_steps={steps}", *QUIET, *extra]
    if threads is not None:
        args.append(f"trainer.threads_per_process={threads}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",) and not k.startswith("WANDB_")}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    while process.poll() is None:
        step = last_step(root / name)
        seen.setdefault(step, time.monotonic())
        time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(f"train.py failed:\n{process.stderr.read()[-3000:]}")
    # the row of step N is written when step N + 1 is logged: the times of rows 10 and steps - 1 bound the steps
    first, last = 10, max(s for s in seen if s < steps)
    return (last - first) / (seen[last] - seen[first])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both runs")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f"python scripts/bench_threads.py {' '.join(sys.argv[1:])}")
    print(f"{args.processes} training processes on {cores} cores (dit_tiny unless overridden)")
    results: dict[str, list[float]] = {"torch default": [], "vdm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for label, threads in (("torch default", cores), ("vdm", None)):
                name = f"{label.replace(' ', '-')}-{repeat}"
                results[label].append(
                    steps_per_second(Path(tmp), name, args.processes, args.steps, threads, args.overrides)
                )
    for label, values in results.items():
        print(f"{label:>14}: {statistics.median(values):.3f} steps/s ({', '.join(f'{v:.3f}' for v in values)})")
    ratio = statistics.median(results["vdm"]) / statistics.median(results["torch default"])
    print(f"ratio vdm / torch default: {ratio:.2f}")


if __name__ == "__main__":
    main()
