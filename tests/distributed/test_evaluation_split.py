"""Evaluation split over ranks gives what one process gives: the held-out loss and the generated clips.

Each run evaluates before its first step, where every layout holds the same weights (the same seed): one process,
and two gloo processes under DDP, FSDP2 and ZeRO-3. Under the sharded two, every forward gathers the parameters from
both ranks, so both must run the same forwards although 5 held-out batches and 3 prompt chunks do not split evenly.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.runs import run_train, succeeded
from vdm.data.video import decode_frames

ROOT = Path(__file__).resolve().parents[2]
CPU_ZERO = "strategy._target_=tests.distributed.cpu_deepspeed.CPUDeepSpeedZeRO"
LAYOUTS = {
    "one": ["trainer.devices=1"],
    "ddp": ["trainer.devices=2"],
    "fsdp2": ["trainer.devices=2", "strategy=fsdp2"],
    "zero3": ["trainer.devices=2", "strategy=deepspeed_zero3", CPU_ZERO],
}
SETTINGS = [
    *("logger=none", "trainer.accelerator=cpu", "trainer.max_steps=1", "trainer.progress_bar=false"),
    *("trainer.checkpoint_every_n_steps=0", "trainer.log_every_n_steps=1", "ema.enabled=false"),
    *("data.batch_size=4", "data.num_workers=0", "data.eval_clips=20"),  # 5 held-out batches of 4
    *("evaluation.at_start=true", "evaluation.num_prompts=6", "evaluation.batch_size=2", "evaluation.weights=raw"),
    *("sampling.prompts=[]", "sampling.steps=2"),  # 3 chunks of 2 prompts
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """{layout: (run directory, output)}"""
    root = tmp_path_factory.mktemp("evaluation")
    outputs = {}
    for name, layout in LAYOUTS.items():
        result = succeeded(run_train(f"run_root={root}", f"name={name}", *SETTINGS, *layout))
        outputs[name] = result.stdout + result.stderr
    return {name: (root / name, outputs[name]) for name in LAYOUTS}


def step_zero(run: Path) -> dict[str, float]:
    with open(run / "metrics.csv", newline="") as file:
        row = next(r for r in csv.DictReader(file) if r["step"] == "0")
    return {k: float(row[k]) for k in ("val/loss", "eval/digit_acc", "eval/motion_acc")}


def clips(run: Path) -> np.ndarray:
    data = (run / "samples" / "eval-step-000000000.mp4").read_bytes()
    return decode_frames(data, range(8)).astype(np.int16)


@pytest.mark.parametrize("layout", ["ddp", "fsdp2", "zero3"])
def test_two_processes_evaluate_what_one_does(runs, layout):
    (run_one, output_one), (run_two, output_two) = runs["one"], runs[layout]
    # the work is split: 5 batches as 3 + 2, 3 prompt chunks as 2 + 1 (one process: all of them)
    assert "over 20 clips (5 of 5 batches on this rank)" in output_one
    assert "over 20 clips (3 of 5 batches on this rank)" in output_two
    assert "over 20 clips (2 of 5 batches on this rank)" in output_two
    assert "over 6 prompts (3 of 3 chunks on rank 0)" in output_one
    assert "over 6 prompts (2 of 3 chunks on rank 0)" in output_two
    one, two = step_zero(run_one), step_zero(run_two)
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6, abs=1e-7)
    assert (two["eval/digit_acc"], two["eval/motion_acc"]) == (one["eval/digit_acc"], one["eval/motion_acc"])
    # the same clip for every prompt, in the same place of the grid (as the video codec writes them)
    assert np.abs(clips(run_two) - clips(run_one)).max() <= 1
