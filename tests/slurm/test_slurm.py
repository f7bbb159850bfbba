"""slurm/train.sbatch on a real Slurm cluster (slurmctld + two slurmd nodes on this machine, see cluster.py).

Real processes end to end: sbatch -> srun -> one train.py per task (each with a DataLoader worker) -> gloo DDP
across "nodes" n1 and n2, 2 micro-batches per optimizer step. SIGUSR1 the way Slurm sends it at the time limit
(to every process of the job step: `scancel -s USR1`, like `--signal=USR1@N`), and then, to the requeued job, the
way sites that use `--signal=B:USR1@N` send it (to the batch shell only: `scancel --batch -s USR1`) -> each time a
checkpoint on every rank at an optimizer-step boundary -> `scontrol requeue` -> the same job id runs again, resumes
its own run directory, and in the end has the losses of an uninterrupted run. No thread setting is passed to the
job: vdm chooses one per process. Needs root and the Slurm packages; skipped without them (failed in CI, where
.ci/run installs them).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import pytest
from cluster import FINAL_STATES, SlurmCluster, require_slurm

from tests.runs import checkpoint_steps, run_train, succeeded, train_env, train_losses, train_steps

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "train.sbatch"
TINY = [
    "logger=none",
    "trainer.log_every_n_steps=1",
    "trainer.eval_every_n_steps=0",
    "trainer.progress_bar=false",
    "data.batch_size=2",
    "data.num_workers=1",  # a loader worker in every task: Slurm signals it too
    "trainer.accumulate_grad_batches=2",  # a signal mostly lands inside an accumulation
    "data.eval_clips=8",
    "sampling.prompts=[]",
    "evaluation=none",
]
STEPS = 12
JOB_ENV = {"VDM_PYTHON": sys.executable}  # no OMP_NUM_THREADS: vdm gives each of the 2 ranks its share of cores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    require_slurm()
    with SlurmCluster(nodes=("n1", "n2"), cpus_per_node=1) as running:
        yield running


def submit(cluster: SlurmCluster, log: Path, *overrides: str, nodes: int = 2) -> int:
    return cluster.sbatch(
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--output={log}",  # not slurm-%x-%j.out in the repository
        str(SCRIPT),
        *TINY,
        *overrides,
        env=JOB_ENV,
        cwd=ROOT,
    )


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_steps(cluster: SlurmCluster, job: int, run: Path, log: Path, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(train_steps(run)) < count:
        state = cluster.state(job)
        assert state not in FINAL_STATES, f"job {job} ended ({state}) before step {count}:\n{read(log)[-4000:]}"
        assert time.monotonic() < deadline, f"no step {count} after {timeout} s:\n{read(log)[-4000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> tuple[Path, Path, int]:
    """The reference: the job run to the end without a signal. (run directory, log, job id)"""
    root = tmp_path_factory.mktemp("uninterrupted")
    log = root / "job.out"
    job = submit(
        cluster,
        log,
        "name=two-nodes",
        f"run_root={root}",
        f"trainer.max_steps={STEPS}",
        f"trainer.checkpoint_every_n_steps={STEPS // 2}",
    )
    cluster.wait(job, timeout=240)
    return root / "two-nodes", log, job


def test_two_nodes_train_together_and_write_the_run_directory(cluster, uninterrupted):
    run, log, job = uninterrupted
    tmp_path = run.parent
    state = cluster.state(job)
    output = read(log)
    assert state == "COMPLETED", f"{state}\n{output[-4000:]}\n{cluster.logs()}"
    info = cluster.show(job)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"

    # the script's own lines: what it derived, and the user's overrides passed through
    assert f"job {job} (vdm), restart 0, nodes 2 (n[1-2]), tasks 2 (1 per node)" in output
    assert "srun " in output and "train.py trainer.num_nodes=2 trainer.devices=1 logger=none" in output
    assert "name=two-nodes" in output and f"name=slurm-{job}" not in output  # the user's name=, not the default
    # one process per node, joined in one process group
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in output
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert "global batch 8 = 2 clips x 2 accumulated x 2 processes" in output
    # each rank chose its threads and said why (each "node" gives its task 1 CPU of this 2-core machine)
    assert output.count("intra-op threads per process: ") == 2

    assert not (tmp_path / f"slurm-{job}").exists()
    assert checkpoint_steps(run) == [STEPS // 2, STEPS]
    assert not list((run / "checkpoints").glob("*.partial"))
    assert train_steps(run) == list(range(1, STEPS + 1))  # every step once, logged by rank 0 only


def requeued_at(log: Path, job: int, times: int, timeout: float = 120) -> int:
    """The step the job's `times`-th requeue resumes from, once its log says so."""
    marker = f"requeued SLURM job {job}: it resumes from step "
    deadline = time.monotonic() + timeout
    while read(log).count(marker) < times:
        assert time.monotonic() < deadline, f"no requeue number {times} after {timeout} s:\n{read(log)[-4000:]}"
        time.sleep(0.2)
    return int(read(log).split(marker)[times].split()[0])


def test_sigusr1_to_the_step_then_to_the_batch_shell_requeues_twice_and_resumes_to_the_uninterrupted_losses(
    cluster, tmp_path, uninterrupted
):
    """What happens at the time limit, sent now, both ways Slurm sends it, to one job: checkpoint, requeue, resume;
    checkpoint, requeue, resume; finish with every step once and the losses of the uninterrupted job."""
    log = tmp_path / "job.out"
    # no name=: the script names the run slurm-<job id>, which the requeued job (same id) finds again
    job = submit(
        cluster, log, f"run_root={tmp_path}", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_n_steps=1000"
    )  # only the preemption checkpoints and the final one
    run = tmp_path / f"slurm-{job}"
    wait_for_steps(cluster, job, run, log, count=2)
    # first as --signal=USR1@N sends it: to every process of the job step
    cluster.scancel(job, "USR1")
    first_stop = requeued_at(log, job, times=1)
    # then, in the requeued job, as --signal=B:USR1@N sends it: to the batch shell only; srun, which the script
    # execs, passes it on to every process of its step
    wait_for_steps(cluster, job, run, log, count=first_stop + 1)  # the requeued job is training
    cluster.scancel(job, "USR1", "--batch")
    second_stop = requeued_at(log, job, times=2)

    state = cluster.wait(job, timeout=300)
    output = read(log)  # --open-mode=append: every run's output
    assert state == "COMPLETED", f"{state}\n{output[-6000:]}\n{cluster.logs()}"
    assert cluster.show(job)["Restarts"] == "2"
    assert "DataLoader worker" not in output  # no worker died of a signal

    for restart in range(3):
        assert f"job {job} (vdm), restart {restart}," in output
    assert output.count("stop requested by signal (") == 4  # both ranks stopped at the same step, twice
    assert output.count("stop requested by signal (SIGUSR1 on this rank)") >= 2
    assert 2 <= first_stop < second_stop < STEPS
    for stopped_at in (first_stop, second_stop):
        assert f"resuming from {run}/checkpoints/step-{stopped_at:09d}.ckpt" in output

    assert checkpoint_steps(run) == [second_stop, STEPS]  # keep_last_checkpoints=2
    assert not list((run / "checkpoints").glob("*.partial"))
    assert train_steps(run) == list(range(1, STEPS + 1))  # none repeated, none skipped
    reference, _, _ = uninterrupted
    assert train_losses(run) == train_losses(reference)  # the run it would have been, bit for bit


def test_plain_scancel_checkpoints_and_ends_the_job(cluster, tmp_path):
    """`scancel JOB` sends SIGTERM: the run checkpoints, and the job stays cancelled (it is not requeued)."""
    log = tmp_path / "job.out"
    job = submit(
        cluster, log, f"run_root={tmp_path}", "trainer.max_steps=200", "trainer.checkpoint_every_n_steps=1000", nodes=1
    )
    run = tmp_path / f"slurm-{job}"
    wait_for_steps(cluster, job, run, log, count=2)
    cluster.scancel(job)

    deadline = time.monotonic() + 60
    while True:  # until the job has ended, or has been queued again
        info = cluster.show(job)
        if info.get("JobState") in FINAL_STATES and "COMPLETING" not in info.get("JobState", ""):
            break
        if info.get("Restarts", "0") != "0" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    output = read(log)
    try:
        assert info.get("Restarts") == "0" and info.get("JobState") == "CANCELLED", f"{info}\n{output[-3000:]}"
        assert "stop requested by signal (SIGTERM on this rank)" in output
        assert len(checkpoint_steps(run)) == 1
        assert "requeued SLURM job" not in output
    finally:
        cluster.kill(job)  # a job that requeued itself would otherwise run on


def test_sequence_parallel_with_fsdp2_across_the_two_nodes_gives_the_losses_and_ema_of_one_process(cluster, tmp_path):
    # one clip split by frames over n1 and n2 (strategy.sequence_parallel_size=2), the weights and their EMA sharded
    # over them (FSDP2): one data rank, so the job trains on what one process alone would, and must log its losses,
    # and with its sharded EMA the held-out losses of that process's whole EMA
    steps = 4
    log = tmp_path / "job.out"
    overrides = [f"run_root={tmp_path}", f"trainer.max_steps={steps}", "trainer.checkpoint_every_n_steps=0"]
    overrides += ["trainer.eval_every_n_steps=2"]  # the held-out loss, with the EMA weights
    job = submit(cluster, log, "name=split", "strategy=fsdp2", "strategy.sequence_parallel_size=2", *overrides)
    cluster.wait(job, timeout=240)
    output = read(log)
    assert cluster.state(job) == "COMPLETED", f"{cluster.state(job)}\n{output[-4000:]}\n{cluster.logs()}"
    for rank in (0, 1):
        assert f"sequence parallelism: rank {rank} is {rank} of 2 in its group" in output
    assert "(EMA weights)" in output
    succeeded(run_train("name=alone", "trainer.devices=1", *TINY, *overrides, env=train_env(OMP_NUM_THREADS="1")))
    split, one = train_losses(tmp_path / "split"), train_losses(tmp_path / "alone")
    assert sorted(split) == sorted(one) == list(range(1, steps + 1))
    for step, loss in one.items():
        assert split[step] == pytest.approx(loss, rel=1e-4), step
    held_out = [held_out_losses(tmp_path / name) for name in ("split", "alone")]
    assert len(held_out[1]) == 3 and held_out[0] == pytest.approx(held_out[1], rel=1e-4)


def held_out_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as file:
        return [float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")]
