"""scripts/bench_train.py for a few steps on the CPU: its figures agree with each other and with the model.

Not a timing assertion: the machine's speed is whatever it is; what must hold is that both loops trained the
same steps to the same losses, and that every printed figure follows from the measured step times.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from vdm.models import SpaceTimeDiT
from vdm.models.flops import tokens_per_clip

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_short_cpu_benchmark_reports_consistent_figures(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--warmup", "1", "--steps", "2", "--repeats", "2", "--json", str(out), "data.batch_size=2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "scripts/bench_train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())

    assert figures["losses_equal"] and figures["max_loss_difference"] == 0.0  # the same training in both loops
    assert len(figures["losses"]) == 1 + 2  # warm-up and timed steps, each loss once
    assert figures["batch_size"] == 2 and figures["clip"] == [3, 8, 32, 32]  # the overrides reached the config
    net = SpaceTimeDiT(in_channels=3, text_dim=64, width=128, depth=4, heads=4, patch_size=(1, 4, 4))
    assert figures["tokens_per_clip"] == tokens_per_clip(net, 8, 32, 32)  # dit_tiny's 512 tokens
    for loop in ("plain", "vdm"):
        run = figures[loop]
        assert len(run["repeat_step_seconds"]) == 2 and all(s > 0 for s in run["repeat_step_seconds"])
        assert run["step_seconds"] == pytest.approx(statistics.median(run["repeat_step_seconds"]))
        assert run["steps_per_sec"] == pytest.approx(1 / run["step_seconds"])
        assert run["clips_per_sec"] == pytest.approx(2 * run["steps_per_sec"])
        assert run["tokens_per_sec"] == pytest.approx(run["clips_per_sec"] * figures["tokens_per_clip"])
        assert run["flops_per_sec"] == pytest.approx(figures["flops_per_step"] / run["step_seconds"])
        assert run["mfu_vs_matmul"] == pytest.approx(run["flops_per_sec"] / figures["matmul_flops"])
        assert run["mfu"] is None and run["peak_memory_gb"] is None  # no known dense peak, no GPU memory on a CPU
    assert figures["overhead_ratio"] == pytest.approx(
        figures["vdm"]["steps_per_sec"] / figures["plain"]["steps_per_sec"]
    )
    assert math.isfinite(figures["overhead_ratio"]) and "overhead ratio (vdm steps/s / plain steps/s)" in result.stdout
