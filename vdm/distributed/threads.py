"""Threads per training process, so that processes sharing a node do not oversubscribe its cores.

torch starts one intra-op thread per core in every process. Two ranks on a 2-core node then run four threads that
wait on each other: dit_tiny ran 0.13 steps/s there against 1.7 for one process (docs/distributed.md). torchrun
sets OMP_NUM_THREADS=1 for this reason; Slurm and Lightning's own launcher do not. vdm gives each process its share
of the cores it may use, less one per DataLoader worker (a busy worker decodes on one core), unless the user chose.
A training process alone on its node keeps every core: its workers mostly wait on a full prefetch queue (the CPU
demo's one worker keeps it fed using about a tenth of a core), and halving the threads of a CPU run for them would
halve its speed.
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

    In order of precedence: the config (`trainer.threads_per_process`); OMP_NUM_THREADS (which torch already
    applied); inside a Slurm allocation, the cores it gives this task (SLURM_CPUS_PER_TASK, else the node's
    SLURM_CPUS_ON_NODE shared by its tasks); outside one, a process alone on its node keeps every core, and
    processes that share a node share the cores they may run on. Data workers' cores are then taken off.
    """
    if setting is not None:
        return setting, "trainer.threads_per_process"
    if env.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    plural = "es" if processes_per_node > 1 else ""
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores, why = int(env["SLURM_CPUS_PER_TASK"]), f"SLURM_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']}"
    elif env.get("SLURM_CPUS_ON_NODE", "").isdigit():
        cores = int(env["SLURM_CPUS_ON_NODE"]) // max(processes_per_node, 1)
        why = f"SLURM_CPUS_ON_NODE={env['SLURM_CPUS_ON_NODE']} / {processes_per_node} process{plural} on this node"
    elif processes_per_node <= 1:
        return None, "the only training process on this node keeps every core"
    else:
        available = cores_available()
        cores, why = available // processes_per_node, f"{available} cores / {processes_per_node} processes on this node"
    threads = max(1, cores - data_workers)
    if data_workers:
        why += f", less {data_workers} for data loader worker{'s' if data_workers > 1 else ''}"
    return threads, why
