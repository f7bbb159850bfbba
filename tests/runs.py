"""Runs of train.py in tests, and reading their run directories back: the one copy of both.

Every test that trains runs the real command line, `python train.py ...`, in a child process, as a user does.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from vdm.models import SpaceTimeDiT
from vdm.models.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
# a key in the environment would log to W&B; a Slurm job's variables would make a child run one of its tasks
FOREIGN = ("WANDB_", "SLURM_")


def train_env(**extra: str) -> dict[str, str]:
    """This process's environment without W&B's and Slurm's variables, plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)} | extra


def run_train(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600, **options):
    """`python train.py *args` in `cwd` (the repository, or a copy of it) to its end: the CompletedProcess, output
    captured as text."""
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=cwd,
        env=train_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **options,
    )


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def train_two_steps(root: Path, *overrides: str) -> Path:
    """Two optimizer steps of the default config (dit_tiny, clip-tiny text encoder, identity autoencoder, flow)
    on the bundled data, run directory `root/x`, with no W&B, no evaluation and no intermediate checkpoint."""
    args = [
        *("name=x", f"run_root={root}", "logger=none", "evaluation=none", "trainer.progress_bar=false"),
        *("trainer.max_steps=2", "trainer.checkpoint_every_n_steps=0", "data.batch_size=2", "data.num_workers=0"),
        *overrides,
    ]
    succeeded(run_train(*args, env=train_env(OMP_NUM_THREADS="1"), timeout=300))
    return root / "x"


# ------------------------------------------------------------------ reading a run directory


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


# ------------------------------------------------------------------ weights to start from


def image_weights(path: Path) -> dict[str, torch.Tensor]:
    """A dit_tiny image model (temporal=false) with every weight random at a trained model's size, not the
    zero-gated init (whose spatial branches pass nothing), saved as a weights file at `path`."""
    arguments = dict(in_channels=3, text_dim=64, width=128, depth=4, heads=4, patch_size=[1, 4, 4], temporal=False)
    with torch.device("meta"):
        shapes = SpaceTimeDiT(**arguments).state_dict()
    generator = torch.Generator().manual_seed(0)
    image = {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in shapes.items()}
    save_weights(path, image, arguments)
    return image
