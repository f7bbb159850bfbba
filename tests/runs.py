"""Reading run directories in tests: which steps a run logged and checkpointed."""

from __future__ import annotations

import csv
from pathlib import Path


def train_steps(run: Path) -> list[int]:
    """Steps of metrics.csv's training rows, in file order (a row still being written is left out)."""
    if not (run / "metrics.csv").exists():
        return []
    with open(run / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    steps = []
    for row in rows:
        try:
            if row.get("train/loss"):
                steps.append(int(row["step"]))
        except (TypeError, ValueError):
            pass
    return steps


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:14]) for p in (run / "checkpoints").glob("step-*.ckpt"))


def train_losses(run: Path) -> dict[int, float]:
    """{step: train/loss} of metrics.csv."""
    with open(run / "metrics.csv", newline="") as file:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")}
