"""A real, short train.py run for the script tests (export, sample) to read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_two_steps(root: Path, *overrides: str) -> Path:
    """Two optimizer steps of the default config (dit_tiny, clip-tiny text encoder, identity autoencoder, flow)
    on the bundled data, run directory `root/x`, with no W&B, no evaluation and no intermediate checkpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}
    args = [
        *("name=x", f"run_root={root}", "logger=none", "evaluation=none", "trainer.progress_bar=false"),
        *("trainer.max_steps=2", "trainer.checkpoint_every_n_steps=0", "data.batch_size=2", "data.num_workers=0"),
        *overrides,
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "x"
