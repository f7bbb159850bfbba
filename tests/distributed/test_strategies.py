"""Real processes, real backends: 2 CPU processes (gloo) through train.py under each strategy.

DDP is the reference. ZeRO stages 1, 2, 3 (DeepSpeed, through tests/distributed/cpu_deepspeed.py since
Lightning allows DeepSpeed only on CUDA) and FSDP2 must give the same losses step by step, partition
what they promise to partition, and resume exactly from their own checkpoints. Every run keeps an EMA: under
ZeRO-3 and FSDP2 each rank averages its own shard (vdm.distributed.shards), which must add up to DDP's EMA.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from scripts.export import export
from tests.runs import image_weights, run_train, succeeded, train_losses
from vdm.checkpoints import NetworkWeights, network_weights, read_checkpoint
from vdm.models.weights import read_weights_file

ROOT = Path(__file__).resolve().parents[2]
CPU_ZERO = "strategy._target_=tests.distributed.cpu_deepspeed.CPUDeepSpeedZeRO"
STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "zero1": ["strategy=deepspeed_zero1", CPU_ZERO],
    "zero2": ["strategy=deepspeed_zero2", CPU_ZERO],
    "zero3": ["strategy=deepspeed_zero3", CPU_ZERO],
    # blocks and root keep their gathered weights after a forward until the backward, so after an evaluation's
    # forwards too: the harder case for the EMA swap (vdm.distributed.shards), which must drop them
    "fsdp2": ["strategy=fsdp2", "strategy.reshard_after_forward=false"],
}
TINY = [
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.log_every_n_steps=1",
    "trainer.eval_every_n_steps=0",
    "trainer.checkpoint_every_n_steps=0",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.eval_clips=8",
    "sampling.prompts=[]",
    "evaluation=none",
    "trainer.progress_bar=false",
]
STEPS = 6
# the weights move from the first step (no warm-up), so the EMA stays apart from them (by 5e-4 after 6 steps) and
# the held-out loss with the EMA swapped in, at steps 0, 2, 4 and 6, is not the raw weights' (1.6709 against
# 1.6566 at step 2, measured); the evaluations between steps also check that the weights are swapped back
MOVING = ["optim.warmup_steps=0", "trainer.eval_every_n_steps=2"]

pytestmark = pytest.mark.slow


def train(run_root: Path, name: str, strategy: str, max_steps: int, *more: str) -> subprocess.CompletedProcess:
    args = [f"run_root={run_root}", f"name={name}", f"trainer.max_steps={max_steps}", *TINY, *MOVING]
    return succeeded(run_train(*args, *STRATEGIES[strategy], *more))


def sharding(run: Path) -> list[dict]:
    return [json.loads((run / "sharding" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / f"step-{STEPS:09d}.ckpt"


def weights_and_ema(run: Path) -> NetworkWeights:
    """The final checkpoint's network and EMA, whole, as scripts/export.py reads them (any layout)."""
    checkpoint = read_checkpoint(final_checkpoint(run))
    return network_weights(checkpoint.state_dict, checkpoint.ema_entry)


def held_out_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as file:
        return {int(row["step"]): float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Each strategy trained STEPS steps from the same seed on the same data, with a checkpoint half way."""
    root = tmp_path_factory.mktemp("strategies")
    for strategy in STRATEGIES:
        train(root, strategy, strategy, STEPS, f"trainer.checkpoint_every_n_steps={STEPS // 2}")
    return {strategy: root / strategy for strategy in STRATEGIES}


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3", "fsdp2"])
def test_losses_equal_ddp_step_by_step(runs, strategy):
    reference, other = train_losses(runs["ddp"]), train_losses(runs[strategy])
    assert sorted(reference) == sorted(other) == list(range(1, STEPS + 1))
    for step in reference:
        assert other[step] == pytest.approx(reference[step], rel=1e-4), f"step {step}"


def test_ddp_replicates_everything(runs):
    for report in sharding(runs["ddp"]):
        assert report["world_size"] == 2
        assert report["parameters_local"] == report["parameters_total"] == report["ema_local"]
        assert report["optimizer_state_local"] == 2 * report["parameters_total"]  # Adam: exp_avg, exp_avg_sq


@pytest.mark.parametrize("strategy", ["zero1", "zero2"])
def test_zero_1_and_2_partition_optimizer_states(runs, strategy):
    reports = sharding(runs[strategy])
    total = reports[0]["parameters_total"]
    for report in reports:
        assert report["parameters_local"] == total  # parameters stay whole
        assert report["optimizer_state_local"] == pytest.approx(total, rel=0.01)  # 2 states x half
    assert sum(r["optimizer_state_local"] for r in reports) == pytest.approx(2 * total, rel=0.01)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_zero3_and_fsdp2_partition_parameters_too(runs, strategy):
    reports = sharding(runs[strategy])
    total = reports[0]["parameters_total"]
    for report in reports:
        assert report["parameters_local"] == pytest.approx(total / 2, rel=0.01)
        assert report["optimizer_state_local"] == pytest.approx(total, rel=0.01)
        assert report["ema_local"] == report["parameters_local"]  # the EMA of its own shard, nothing more
    assert sum(r["parameters_local"] for r in reports) >= total


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_sharded_ema_adds_up_to_ddps_and_is_what_evaluates_and_exports(runs, strategy, tmp_path):
    reference, sharded = weights_and_ema(runs["ddp"]), weights_and_ema(runs[strategy])
    assert sharded.ema.keys() == reference.ema.keys() == reference.net.keys()
    for name, average in reference.ema.items():  # each rank's shards, joined, are DDP's whole EMA
        torch.testing.assert_close(sharded.ema[name], average, rtol=0, atol=2e-6, msg=name)
    assert max((reference.ema[k] - reference.net[k]).abs().max() for k in reference.net) > 1e-4  # not the weights
    # the held-out loss is taken with the EMA swapped into each rank's shard (gathered by every forward) and the
    # weights swapped back: DDP's at every evaluation, and the training losses after them too
    assert held_out_losses(runs[strategy]) == pytest.approx(held_out_losses(runs["ddp"]), rel=1e-5)
    assert sorted(held_out_losses(runs[strategy])) == [0, 2, 4, 6]
    # scripts/export.py writes the whole EMA, as for DDP's run
    written = {}
    for name in ("ddp", strategy):
        out = tmp_path / f"{name}.safetensors"
        assert export(final_checkpoint(runs[name]), out)["ema"]
        written[name] = read_weights_file(out, ema=True)[1]
    assert written[strategy].keys() == written["ddp"].keys()
    for name, average in written["ddp"].items():
        assert torch.equal(written[strategy][name], sharded.ema[name]), name
        torch.testing.assert_close(written[strategy][name], average, rtol=0, atol=2e-6, msg=name)


def test_a_zero3_ema_is_refused_on_another_number_of_processes(runs, tmp_path):
    shutil.copytree(runs["zero3"], tmp_path / "zero3")
    one_process = [a for a in TINY if not a.startswith("trainer.devices=")] + ["trainer.devices=1"]
    args = [f"run_root={tmp_path}", "name=zero3", f"trainer.max_steps={STEPS + 1}", *one_process, *MOVING]
    result = run_train(*args, *STRATEGIES["zero3"])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "holds an EMA partitioned by ZeRO-3 over 2 processes" in result.stderr
    assert "resume with 2 processes" in result.stderr and "init_ema=true" in result.stderr


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp2"])
def test_checkpoint_resumes_exactly(runs, strategy, tmp_path):
    # the run as a crash half way would have left it: its files, and no checkpoint after the half-way one
    shutil.copytree(runs[strategy], tmp_path / strategy)
    half_way = f"step-{STEPS // 2:09d}.ckpt"
    later = [p for p in (tmp_path / strategy / "checkpoints").iterdir() if p.name > half_way]
    assert later and (tmp_path / strategy / "checkpoints" / half_way).exists()
    for checkpoint in later:
        shutil.rmtree(checkpoint) if checkpoint.is_dir() else checkpoint.unlink()
    result = train(tmp_path, strategy, strategy, STEPS)  # the same command again continues it
    assert f"resuming from {tmp_path / strategy / 'checkpoints' / half_way}" in result.stdout + result.stderr
    assert train_losses(tmp_path / strategy) == train_losses(runs[strategy])
    assert held_out_losses(tmp_path / strategy) == held_out_losses(runs[strategy])
    # the EMA (each rank's shard of it under ZeRO-3 and FSDP2) carried over bit for bit
    resumed, uninterrupted = weights_and_ema(tmp_path / strategy), weights_and_ema(runs[strategy])
    assert all(torch.equal(resumed.ema[k], uninterrupted.ema[k]) for k in uninterrupted.ema)


def test_lora_fine_tuning_gives_ddps_losses_under_zero2_and_partitions_only_what_trains(tmp_path):
    """LoRA on the spatial attention and MLP of an image model inflated into a video model, with the temporal layers
    the only other trainable part: ZeRO-2 gives DDP's losses step by step, and its two ranks split the optimizer
    states of the trainable parameters (adapters and temporal layers) only."""
    image_weights(tmp_path / "image.safetensors")
    lora = [f"init_from={tmp_path / 'image.safetensors'}", "optim.lora_rank=4", "optim.trainable=temporal"]
    for strategy in ("ddp", "zero2"):
        train(tmp_path, strategy, strategy, 3, *lora)
    reference, other = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "zero2")
    assert sorted(reference) == sorted(other) == [1, 2, 3]
    for step in reference:
        assert other[step] == pytest.approx(reference[step], rel=1e-4), f"step {step}"
    ddp, zero2 = sharding(tmp_path / "ddp"), sharding(tmp_path / "zero2")
    trainable = ddp[0]["parameters_trainable"]
    assert 0 < trainable < ddp[0]["parameters_total"] and ddp[0]["optimizer_state_local"] == 2 * trainable
    assert all(r["parameters_trainable"] == trainable for r in zero2)
    assert sum(r["optimizer_state_local"] for r in zero2) == pytest.approx(2 * trainable, rel=0.01)  # padding
