"""Threads per training process: the cores a process may use, shared by the processes of its node."""

from __future__ import annotations

import pytest

from vdm.distributed import threads
from vdm.distributed.threads import threads_per_process


@pytest.fixture
def cores(monkeypatch):
    def set_cores(count: int) -> None:
        monkeypatch.setattr(threads, "cores_available", lambda: count)

    return set_cores


def test_the_cores_are_shared_by_the_processes_of_a_node_less_one_per_data_worker(cores):
    cores(96)
    assert threads_per_process(None, processes_per_node=8, data_workers=4, env={}) == (
        8,
        "96 cores / 8 processes on this node, less 4 for data loader workers",
    )
    cores(2)  # two ranks with a worker each on a 2-core machine: one thread each, never none
    assert threads_per_process(None, processes_per_node=2, data_workers=1, env={})[0] == 1
    # alone on its node a process keeps every core (torch's default): its worker mostly waits
    assert threads_per_process(None, processes_per_node=1, data_workers=1, env={}) == (
        None,
        "the only training process on this node keeps every core",
    )


def test_slurm_cpus_per_task_are_this_task_s_cores(cores):
    cores(128)  # without task binding, the affinity is the whole node
    env = {"SLURM_CPUS_PER_TASK": "12"}
    assert threads_per_process(None, processes_per_node=8, data_workers=2, env=env) == (
        10,
        "SLURM_CPUS_PER_TASK=12, less 2 for data loader workers",
    )


def test_inside_a_slurm_allocation_its_cpus_count_not_the_machine_s(cores):
    cores(2)  # the test cluster: two 1-CPU "nodes" on this 2-core machine, nothing bound
    env = {"SLURM_CPUS_ON_NODE": "1"}
    assert threads_per_process(None, processes_per_node=1, data_workers=1, env=env) == (
        1,
        "SLURM_CPUS_ON_NODE=1 / 1 process on this node, less 1 for data loader worker",
    )
    env = {"SLURM_CPUS_ON_NODE": "64"}
    assert threads_per_process(None, processes_per_node=8, data_workers=2, env=env)[0] == 6


def test_the_user_s_choice_wins(cores):
    cores(64)
    env = {"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "12"}
    assert threads_per_process(5, processes_per_node=8, data_workers=2, env=env) == (5, "trainer.threads_per_process")
    # OMP_NUM_THREADS: torch has applied it already; nothing to set
    assert threads_per_process(None, processes_per_node=8, data_workers=2, env=env) == (None, "OMP_NUM_THREADS=3")
