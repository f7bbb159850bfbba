"""Runs of train.py that meet faults on purpose: a NaN on one rank, weights gone bad, a full disk.

The faults are real: a NaN in a real forward (tests/training/faulty_dit.py), a checkpoint write that
the kernel refuses (RLIMIT_FSIZE: the write fails with EFBIG exactly as it fails with ENOSPC on a
full disk, through the same OSError path).
"""

from __future__ import annotations

import json
import resource

import pytest
import torch

from tests.runs import checkpoint_steps
from tests.test_train_cli import TINY_NO_WANDB, metric_rows, train

FAULTY = "model._target_=tests.training.faulty_dit.FaultyDiT"
COMMON = [
    *TINY_NO_WANDB,
    "trainer.log_every_n_steps=1",
    "trainer.eval_every_n_steps=0",
    "trainer.checkpoint_every_n_steps=1",
    "trainer.keep_last_checkpoints=100",
    "sampling.prompts=[]",
    "evaluation=none",
    "data.num_workers=0",
    "ema.decay=0.9",
    FAULTY,
]
DDP2 = ["trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp"]

pytestmark = pytest.mark.slow


def load(run, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:09d}.ckpt", weights_only=False)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_tensors(checkpoint: dict) -> dict:
    state = checkpoint["optimizer_states"][0]["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


def test_a_nan_on_one_rank_skips_that_step_on_every_rank_and_is_recorded_with_its_keys(tmp_path):
    result = train(
        f"run_root={tmp_path}",
        "name=nan-rank1",
        "trainer.max_steps=4",
        *COMMON,
        *DDP2,
        "+model.nan_output_at=[3]",
        "+model.nan_rank=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "nan-rank1"
    (record,) = [json.loads(line) for line in (run / "nonfinite.jsonl").read_text().splitlines()]
    assert record["step"] == 3
    by_rank = {r["rank"]: r for r in record["ranks"]}
    assert by_rank[1]["loss_finite"] is False and by_rank[0]["loss_finite"] is True
    assert len(by_rank[1]["keys"]) == 4 and not set(by_rank[0]["keys"]) & set(by_rank[1]["keys"])
    output = result.stdout + result.stderr
    assert "step 3 skipped: non-finite loss" in output and by_rank[1]["keys"][0] in output

    # rank 0's loss was finite, yet its replica skipped the step too: weights, optimizer and EMA unchanged
    before, skipped, after = load(run, 2), load(run, 3), load(run, 4)
    assert same_tensors(before["state_dict"], skipped["state_dict"])
    assert same_tensors(optimizer_tensors(before), optimizer_tensors(skipped))
    assert same_tensors(before["ema"]["weights"], skipped["ema"]["weights"])
    assert not same_tensors(skipped["state_dict"], after["state_dict"])
    assert all(torch.isfinite(v).all() for v in after["state_dict"].values())
    counts = {int(r["step"]): r["nonfinite_steps"] for r in metric_rows(run)}
    assert counts[3] == "1"


@pytest.mark.parametrize(
    "fault, message, last_checkpoint",
    [
        (
            ["+model.nan_output_at=[2,3,4,5,6]", "trainer.max_nonfinite_steps_in_row=3"],
            "stopped at step 4: 3 optimizer steps in a row had a non-finite loss or gradient",
            3,
        ),
        # 2: the spoiled weight and its EMA
        (["+model.nan_weights_at=2"], "refusing to write the checkpoint of step 2: 2 weights are not finite", 1),
    ],
    ids=["nan-in-a-row", "nan-weights"],
)
def test_persistent_non_finite_training_stops_with_its_own_status_and_no_bad_checkpoint(
    tmp_path, fault, message, last_checkpoint
):
    result = train(f"run_root={tmp_path}", "name=bad", "trainer.max_steps=8", *COMMON, *fault)
    assert result.returncode == 3, result.stderr[-3000:]
    assert message in result.stderr
    run = tmp_path / "bad"
    assert checkpoint_steps(run) == list(range(1, last_checkpoint + 1))
    assert not list((run / "checkpoints").glob("*.partial"))
    for step in checkpoint_steps(run):
        checkpoint = load(run, step)
        for tensors in (checkpoint["state_dict"], checkpoint["ema"]["weights"]):
            assert all(torch.isfinite(v).all() for v in tensors.values()), step


def test_a_save_the_disk_refuses_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    args = [f"run_root={tmp_path}", "name=full", *COMMON, *DDP2, "trainer.checkpoint_every_n_steps=2"]
    first = train(*args, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "full"
    size = (run / "checkpoints" / "step-000000002.ckpt").stat().st_size
    assert size > 256 * 1024  # the limit below must stop the checkpoint, not the logs

    def small_disk():  # in the child and its ranks: no file may grow past half a checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    full = train(*args, "trainer.max_steps=4", preexec_fn=small_disk)
    assert full.returncode == 4, full.stderr[-3000:]
    assert "the checkpoint of step 4 could not be written ([Errno 27] File too large: " in full.stderr
    assert "step-000000002.ckpt is intact and the same command resumes from it" in full.stderr
    assert checkpoint_steps(run) == [2] and not list((run / "checkpoints").glob("*.partial"))

    again = train(*args, "trainer.max_steps=4")  # room again: the same command goes on from step 2
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr and checkpoint_steps(run) == [2, 4]
