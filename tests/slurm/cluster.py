"""A real Slurm cluster for tests: slurmctld and two slurmd nodes (n1, n2) on this machine's loopback.

`SlurmCluster` writes a slurm.conf into a private temporary folder (state, spool, logs and pid files live
there too), starts `slurmctld` and one `slurmd -N <node>` per node, and waits until `sinfo` shows every node
idle. Authentication is `auth/none` + `cred/none`, so no munge daemon or key is needed; everything runs as
root. Requeued jobs restart in seconds (`AuthInfo=cred_expire=5`, fast scheduler intervals) instead of the
default two minutes.

Every client call and every job gets `SLURM_CONF` pointing at the private slurm.conf, so the cluster never
reads or touches /etc/slurm. Teardown cancels the jobs this object submitted, runs `scontrol shutdown`, then
stops what is left by PID (never by name) and deletes the folder. The node names are added to /etc/hosts
(as 127.0.0.1) if they do not resolve, because Lightning derives MASTER_ADDR from SLURM_NODELIST; a line
added here is removed again at teardown.

Needs root and Debian's `slurmctld slurmd slurm-client` packages (22.05 tested). `require_slurm()` skips a
test without them, or fails it when CI=true, where they must be installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "scancel", "squeue")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# added by vdm tests/slurm/cluster.py"
# a job in one of these states will not run again
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_requirements() -> str | None:
    """Why a Slurm cluster cannot be stood up here, or None if it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the Slurm tests run slurmctld/slurmd and need root"
    missing = [name for name in DAEMONS + CLIENTS if find_binary(name) is None]
    if missing:
        return (
            f"Slurm binaries not found: {', '.join(missing)} "
            "(apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)"
        )
    return None


def require_slurm() -> None:
    """Skip the calling test (module, fixture) without Slurm; in CI (CI=true) fail instead."""
    import pytest

    reason = missing_requirements()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def resolves(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """slurmctld + one slurmd per node on 127.0.0.1. Use as a context manager, or start()/stop()."""

    def __init__(self, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 1, root: Path | None = None):
        self.nodes, self.cpus_per_node = nodes, cpus_per_node
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="vdm-slurm-")) if root is None else Path(root)
        self.conf = self.root / "slurm.conf"
        self.hostname = socket.gethostname()
        self.jobs: list[int] = []  # everything submitted through this object (cancelled at teardown)
        self._hosts_line: str | None = None
        self._pids: list[int] = []

    # ---------------------------------------------------------------- setup and teardown
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment for clients and jobs: this cluster's slurm.conf, no Slurm variables of an outer job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = ":".join(dict.fromkeys([*env.get("PATH", "").split(":"), *SBIN]))
        return env

    def write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        for folder in ("state", "spool", "log", "run"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        lines = [
            "ClusterName=vdmtest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "AuthInfo=cred_expire=5",  # a requeued job may start again 5 s after it ended (default 120)
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` for the tests
            "KillWait=30",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/run/slurmctld.pid",
            f"SlurmdPidFile={self.root}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} State=UNKNOWN"
            )
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def add_hosts(self) -> None:
        names = [n for n in self.nodes if not resolves(n)]
        if not names:
            return
        line = f"127.0.0.1 {' '.join(names)} {HOSTS_MARK}\n"
        text = HOSTS.read_text()
        with open(HOSTS, "a") as file:  # appended in place: /etc/hosts is often a bind mount
            file.write(("" if text.endswith("\n") or not text else "\n") + line)
        self._hosts_line = line

    def remove_hosts(self) -> None:
        if self._hosts_line is None:
            return
        text = HOSTS.read_text()
        if self._hosts_line in text:
            with open(HOSTS, "w") as file:  # rewritten in place, not replaced
                file.write(text.replace(self._hosts_line, ""))
        self._hosts_line = None

    def start(self, timeout: float = 60) -> SlurmCluster:
        try:
            self.write_conf()
            self.add_hosts()
            self._daemon(find_binary("slurmctld"), "-i", pid_file=self.root / "run" / "slurmctld.pid")
            for node in self.nodes:
                self._daemon(find_binary("slurmd"), "-N", node, pid_file=self.root / "run" / f"slurmd-{node}.pid")
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _daemon(self, binary: str | None, *args: str, pid_file: Path, timeout: float = 20) -> int:
        result = subprocess.run([binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise SlurmError(f"{binary} {' '.join(args)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the daemon writes its pid file once it has forked
            if pid_file.exists() and (text := pid_file.read_text().strip()).isdigit():
                self._pids.append(int(text))
                return int(text)
            time.sleep(0.1)
        raise SlurmError(f"{binary} {' '.join(args)}: no pid file {pid_file} after {timeout} s\n{self.logs()}")

    def node_states(self) -> dict[str, str]:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(0.3)
        raise SlurmError(f"nodes not idle after {timeout} s: {states}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel our jobs, shut the daemons down, kill what is left by PID, remove the folder."""
        try:
            if self.conf.exists() and self._pids:
                for job in self.jobs:
                    try:
                        self.kill(job)
                    except (TimeoutError, SlurmError, subprocess.TimeoutExpired):
                        pass
                self.run("scontrol", "shutdown", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(alive(pid) for pid in self._pids):
                time.sleep(0.2)
            # daemons that did not stop, then anything a job left behind (it carries this cluster's SLURM_CONF)
            for pid in [*self._pids, *self.job_processes()]:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    if alive(pid):
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            break
                        wait_gone(pid, 5)
            self._pids = []
        finally:
            self.remove_hosts()
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def job_processes(self) -> list[int]:
        """PIDs of processes started under this cluster (their environment holds its SLURM_CONF)."""
        marker = f"\0SLURM_CONF={self.conf}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in b"\0" + (entry / "environ").read_bytes() + b"\0":
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def logs(self, lines: int = 40) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ---------------------------------------------------------------- clients
    def run(self, *args: str, check: bool = True, env: dict | None = None, cwd=None, timeout: float = 30):
        result = subprocess.run(
            [find_binary(args[0]) or args[0], *args[1:]],
            env=self.env | (env or {}),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> int:
        """Submit; returns the job id. `env` is added to this cluster's environment (sbatch exports it all)."""
        result = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        job = int(result.stdout.strip().split(";")[0])
        self.jobs.append(job)
        return job

    def show(self, job: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ExitCode, ...); {} once forgotten."""
        result = self.run("scontrol", "-o", "show", "job", str(job), check=False)
        if result.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(\w+)=(\S*)", result.stdout):
            fields.setdefault(key, value)  # the first: Command=... may carry key=value arguments of its own
        return fields

    def state(self, job: int) -> str:
        return self.show(job).get("JobState", "UNKNOWN")

    def wait(self, job: int, timeout: float = 120, states: set[str] | None = None) -> str:
        """Wait until the job reaches a final state (or one of `states`); returns that state."""
        wanted = states or FINAL_STATES
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in wanted:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {state} after {timeout} s\n{self.logs()}")

    def scancel(self, job: int, signal_name: str | None = None, *options: str) -> None:
        """scancel; with a signal (e.g. "USR1") it is sent to the job steps, not the batch shell."""
        self.run("scancel", *(["-s", signal_name] if signal_name else []), *options, str(job))

    def kill(self, job: int, timeout: float = 60) -> str:
        """End a job for good, whatever its processes do on SIGTERM (a job may requeue itself when cancelled).

        A running job gets SIGKILL in every step and in the batch shell (a job that ends so is not requeued);
        a pending one is cancelled. Returns the final state.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job)
            if state in FINAL_STATES or state == "UNKNOWN":
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {state} after {timeout} s")
            if state == "RUNNING":
                self.run("scancel", "--signal=KILL", "--full", str(job), check=False)
            elif state != "COMPLETING":
                self.run("scancel", str(job), check=False)
            time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


@contextmanager
def slurm_cluster(**kwargs) -> Iterator[SlurmCluster]:
    """`with slurm_cluster() as cluster:`; skips (or fails in CI) where Slurm cannot run."""
    require_slurm()
    with SlurmCluster(**kwargs) as cluster:
        yield cluster
