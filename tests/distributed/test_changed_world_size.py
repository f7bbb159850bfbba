"""A run saved by 2 processes resumed with 1, and back: real CPU processes (gloo) through train.py.

DDP checkpoints are whole; FSDP2 checkpoints are re-sharded by torch.distributed.checkpoint, the EMA's shards
with the weights; a ZeRO-2 checkpoint is refused, naming DeepSpeed's conversion command, until its universal
copy is written, and then loads from it. Weights, optimizer states and the EMA carry over: the three continue
with the same losses step by step (a fresh optimizer would not), FSDP2 with DDP's EMA. The data stream is
re-derived for the new layout; its promise (every sample of a pass begun once) is held by
tests/data/test_reshard.py. (A ZeRO-3 EMA is refused on another number of processes: test_strategies.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import runs
from tests.distributed.test_strategies import CPU_ZERO, ROOT, TINY
from tests.runs import run_train, train_losses
from vdm.checkpoints import network_weights, read_checkpoint

pytestmark = pytest.mark.slow

STRATEGIES = {"ddp": ["strategy=ddp"], "fsdp2": ["strategy=fsdp2"], "zero2": ["strategy=deepspeed_zero2", CPU_ZERO]}
ARGS = [a for a in TINY if not a.startswith(("trainer.devices=", "data.eval_clips="))]
ARGS += ["data.eval_shards=null"]  # no held-out loss
if (ROOT / "conf" / "evaluation" / "none.yaml").exists():  # no sampled-quality evaluation at the end either
    ARGS += ["evaluation=none"]
CHANGED = "data stream: the checkpoint was written by 2 processes x 1 loader workers, this run has 1 x 1"


def train(run_root: Path, strategy: str, devices: int, max_steps: int) -> subprocess.CompletedProcess:
    args = [f"run_root={run_root}", f"name={strategy}", f"trainer.devices={devices}", f"trainer.max_steps={max_steps}"]
    return run_train(*args, *ARGS, *STRATEGIES[strategy])


def succeeded(result: subprocess.CompletedProcess) -> str:
    return output(runs.succeeded(result))


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def ema_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    read = read_checkpoint(checkpoint)
    return network_weights(read.state_dict, read.ema_entry).ema


def adam_steps(checkpoint: Path) -> set[int]:
    state = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]["state"]
    return {int(s["step"]) for s in state.values()}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """DDP: 2 processes to step 2, 1 process to step 4, 2 processes to step 6."""
    root = tmp_path_factory.mktemp("ddp")
    succeeded(train(root, "ddp", 2, 2))
    fewer = succeeded(train(root, "ddp", 1, 4))
    assert "resuming from" in fewer and CHANGED in fewer
    assert "global batch: 8 clips per optimizer step before (4 x 1 accumulated x 2 processes), 4 now" in fewer
    run = root / "ddp"
    assert adam_steps(run / "checkpoints" / "step-000000004.ckpt") == {4}  # the optimizer went on, not afresh
    more = succeeded(train(root, "ddp", 2, 6))
    assert "this run has 2 x 1" in more and "global batch: 4 clips per optimizer step before" in more
    assert adam_steps(run / "checkpoints" / "step-000000006.ckpt") == {6}
    return run


def test_ddp_resumes_on_fewer_then_more_processes(ddp):
    assert sorted(train_losses(ddp)) == list(range(1, 7))


def test_fsdp2_resumes_on_fewer_then_more_processes_like_ddp(ddp, tmp_path):
    succeeded(train(tmp_path, "fsdp2", 2, 2))
    assert CHANGED in succeeded(train(tmp_path, "fsdp2", 1, 4))
    # a single process with a process group still saves its stream position (the layout change is seen)
    assert "this run has 2 x 1" in succeeded(train(tmp_path, "fsdp2", 2, 6))
    reference, resumed = train_losses(ddp), train_losses(tmp_path / "fsdp2")
    assert sorted(resumed) == list(range(1, 7))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4), f"step {step}"
    # the EMA's shards were re-cut 2 -> 1 -> 2 with the weights: its whole value is still DDP's
    ema = {run: ema_of(run / "checkpoints" / "step-000000006.ckpt") for run in (ddp, tmp_path / "fsdp2")}
    for name, average in ema[ddp].items():
        torch.testing.assert_close(ema[tmp_path / "fsdp2"][name], average, rtol=0, atol=2e-6, msg=name)


def test_zero2_is_refused_until_converted_to_a_universal_checkpoint_then_resumes_like_ddp(ddp, tmp_path):
    succeeded(train(tmp_path, "zero2", 2, 2))
    refused = train(tmp_path, "zero2", 1, 4)
    assert refused.returncode == 2, refused.stderr[-3000:]
    command = next(line.strip() for line in refused.stderr.splitlines() if "ds_to_universal" in line)
    assert command.startswith("python -m deepspeed.checkpoint.ds_to_universal --input_folder ")
    converted = subprocess.run(command.replace("python", sys.executable, 1).split(), capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr[-3000:]

    output = succeeded(train(tmp_path, "zero2", 1, 4))
    assert "loading the universal copy" in output and CHANGED in output
    reference, resumed = train_losses(ddp), train_losses(tmp_path / "zero2")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4), f"step {step}"
