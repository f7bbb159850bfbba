"""Preemption without Slurm: a signal to a running `python train.py` checkpoints, stops, and the run resumes.

vdm.training.preemption: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (scancel, preemption)
sets a flag; at the next optimizer-step boundary the run writes one checkpoint and stops with status 0. Only when
SLURM_JOB_ID is set does rank 0 ask Slurm to requeue the job; a fake `scontrol` on PATH records whether it did.

The signal goes where Slurm sends it: to every process of the run (the training process, its DataLoader worker,
W&B's service process), not only to the training process.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.runs import checkpoint_steps, train_losses, train_steps

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "logger=none",
    "trainer.log_every_n_steps=1",
    "trainer.eval_every_n_steps=0",
    "trainer.checkpoint_every_n_steps=1000",  # only the checkpoint the signal asks for
    "trainer.progress_bar=false",
    "data.batch_size=4",
    "data.num_workers=1",  # a loader worker receives the signal too
    "data.eval_clips=8",
    "sampling.prompts=[]",
    "evaluation=none",
]
MAX_STEPS = 200  # far more than the test lets it run

pytestmark = pytest.mark.slow


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without Slurm's or W&B's variables, and a fake scontrol that records its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol-calls"}\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "WANDB_"))}
    return env | {"PATH": f"{bin_dir}:{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"} | extra


def scontrol_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "scontrol-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def signal_every_process(process: subprocess.Popen, signum: int) -> list[str]:
    """`signum` to the process and all its descendants, as Slurm signals every process of a job step; their names."""
    tree = psutil.Process(process.pid)
    targets = [tree, *tree.children(recursive=True)]
    for target in targets:
        with contextlib.suppress(psutil.NoSuchProcess):
            target.send_signal(signum)
    return [target.name() for target in targets if target.is_running()]


def run_until_signalled(
    tmp_path: Path, name: str, signum: int, after_step: int, env: dict, *overrides: str, max_steps: int = MAX_STEPS
) -> tuple[int, str]:
    """Start `train.py`, signal every process of it once metrics.csv shows `after_step`; (exit status, output)."""
    run = tmp_path / name
    log = tmp_path / f"{name}-{len(list(tmp_path.glob(f'{name}-*.log')))}.log"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"name={name}",
        f"run_root={tmp_path}",
        f"trainer.max_steps={max_steps}",
        *TINY,
        *overrides,
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (train_steps(run) and train_steps(run)[-1] >= after_step):
            assert process.poll() is None, f"train.py ended ({process.returncode}) first:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no step {after_step} in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.1)
        signalled_processes = signal_every_process(process, signum)
        assert len(signalled_processes) >= 2, signalled_processes  # the training process and its loader worker
        signalled = time.monotonic()
        status = process.wait(timeout=90)
        assert time.monotonic() - signalled < 60, "stopping took too long"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, log.read_text()


def test_a_signal_checkpoints_and_stops_and_the_same_command_resumes(tmp_path):
    """SIGUSR1 stops the first run, SIGTERM the resumed one: each checkpoints the step it stopped at and exits 0."""
    env = environment(tmp_path)
    run = tmp_path / "preempted"
    status, output = run_until_signalled(tmp_path, "preempted", signal.SIGUSR1, after_step=3, env=env)
    assert status == 0, output[-4000:]
    assert "stop requested by signal (SIGUSR1 on this rank)" in output
    stopped_at = train_steps(run)[-1]
    assert 3 <= stopped_at < MAX_STEPS
    assert checkpoint_steps(run) == [stopped_at]  # the step the run stopped at, nothing after it
    assert not list((run / "checkpoints").glob("*.partial"))
    assert scontrol_calls(tmp_path) == [] and "requeue" not in output  # no SLURM_JOB_ID: no requeue

    # the same command continues from that checkpoint; SIGTERM stops it the same way
    status, output = run_until_signalled(tmp_path, "preempted", signal.SIGTERM, after_step=stopped_at + 3, env=env)
    assert status == 0, output[-4000:]
    assert f"resuming from {run}/checkpoints/step-{stopped_at:09d}.ckpt" in output
    assert "stop requested by signal (SIGTERM on this rank)" in output
    stopped_again = train_steps(run)[-1]
    assert stopped_again >= stopped_at + 3
    assert checkpoint_steps(run) == [stopped_at, stopped_again]
    assert not list((run / "checkpoints").glob("*.partial"))
    assert train_steps(run) == list(range(1, stopped_again + 1))  # strictly increasing, none repeated or skipped
    assert scontrol_calls(tmp_path) == [] and "requeue" not in output


def test_metrics_csv_has_one_row_per_step_after_a_preemption(tmp_path):
    status, output = run_until_signalled(tmp_path, "rows", signal.SIGUSR1, after_step=2, env=environment(tmp_path))
    assert status == 0, output[-4000:]
    with open(tmp_path / "rows" / "metrics.csv", newline="") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file)]
    assert steps == list(range(0, steps[-1] + 1))  # step 0: the held-out loss before training


@pytest.mark.parametrize(
    "signum, requeues",
    [
        pytest.param(signal.SIGUSR1, True, id="SIGUSR1-requeues"),
        pytest.param(signal.SIGTERM, False, id="SIGTERM-does-not-requeue"),
    ],
)
def test_under_slurm_rank_zero_requeues_the_job_only_for_sigusr1(tmp_path, signum, requeues):
    """SIGUSR1 comes before the time limit: requeue. SIGTERM is scancel or preemption: Slurm decides, not the run."""
    env = environment(tmp_path, SLURM_JOB_ID="4242")  # no SLURM_NTASKS: still a single plain process
    status, output = run_until_signalled(tmp_path, "job", signum, after_step=2, env=env)
    assert status == 0, output[-4000:]
    assert len(checkpoint_steps(tmp_path / "job")) == 1
    assert scontrol_calls(tmp_path) == (["requeue 4242"] if requeues else [])
    assert ("requeued SLURM job 4242" in output) == requeues


def test_sigterm_to_every_process_inside_a_gradient_accumulation_resumes_to_the_uninterrupted_losses(tmp_path):
    """SIGTERM to the training process, its loader worker and W&B's service process, with 2 micro-batches per step.

    The run must checkpoint at an optimizer-step boundary (a half-accumulated step would lose its gradient and its
    micro-batch), survive the death of W&B's service (it exits on SIGTERM), and the resumed run must give the
    uninterrupted run's losses step for step.
    """
    steps = 12
    overrides = ("trainer.accumulate_grad_batches=2", "logger=wandb", "trainer.eval_every_n_steps=0")
    env = environment(tmp_path)

    def run_to_the_end(name: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "train.py", f"name={name}", f"run_root={tmp_path}", f"trainer.max_steps={steps}"]
        return subprocess.run(
            [*args, *TINY, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    reference = run_to_the_end("reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    status, output = run_until_signalled(tmp_path, "stopped", signal.SIGTERM, 3, env, *overrides, max_steps=steps)
    assert status == 0, output[-4000:]
    assert "DataLoader worker" not in output, output[-4000:]  # no worker died of the signal
    assert "stop requested by signal (SIGTERM on this rank)" in output
    assert "W&B logging stopped" in output  # wandb-core exits on SIGTERM; the run went on to its checkpoint
    run = tmp_path / "stopped"
    stopped_at = checkpoint_steps(run)[-1]
    assert 3 <= stopped_at < steps

    resumed = run_to_the_end("stopped")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-{stopped_at:09d}.ckpt" in resumed.stdout + resumed.stderr
    assert train_steps(run) == list(range(1, steps + 1))  # every step logged once
    assert train_losses(run) == train_losses(tmp_path / "reference")  # bit for bit, on the CPU
