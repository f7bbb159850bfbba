"""Threads per training process, so that processes sharing a node do not oversubscribe its cores.

torch starts one intra-op thread per core in every process. Two ranks on a 2-core node then run four threads that
wait on each other: dit_tiny ran 0.13 steps/s there against 1.7 for one process (docs/distributed.md). torchrun
sets OMP_NUM_THREADS=1 for this reason; Slurm and Lightning's own launcher do not. vdm gives each process its share
of the cores it may use, less one per DataLoader worker (a worker decodes on one core), unless the user chose.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity: Slurm's task binding, a cgroup's cpuset, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_process(
    setting: int | None, *, processes_per_node: int, data_workers: int, env: Mapping[str, str] = os.environ
) -> tuple[int | None, str]:
    """(intra-op threads for this process, or None to leave torch's choice; why).

    The order of precedence: the config (`trainer.threads_per_process`), then OMP_NUM_THREADS (which torch already
    applied), then Slurm's SLURM_CPUS_PER_TASK (the cores of this task), then the cores this process may run on
    shared by the training processes of the node.
    """
    if setting is not None:
        return setting, "trainer.threads_per_process"
    if env.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores, why = int(env["SLURM_CPUS_PER_TASK"]), f"SLURM_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']}"
    else:
        available = cores_available()
        cores = available // max(processes_per_node, 1)
        why = f"{available} cores / {processes_per_node} process{'es' if processes_per_node > 1 else ''} on this node"
    threads = max(1, cores - data_workers)
    if data_workers:
        why += f", less {data_workers} for data loader worker{'s' if data_workers > 1 else ''}"
    return threads, why
