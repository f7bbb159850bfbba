"""Experiment loggers from settings. W&B never hangs a run: without a key or a network it runs offline."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_key_available() -> bool:
    """A W&B key in the environment or in ~/.netrc (where `wandb login` puts it). Never read into config."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


@dataclass
class Wandb:
    """Weights & Biases. mode: auto (online when a key is set up, else offline), online, offline."""

    project: str = "vdm"
    entity: str | None = None
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds to reach the server before falling back to offline

    def __post_init__(self):
        if self.mode not in ("auto", "online", "offline"):
            raise ValueError(f"mode must be auto, online or offline (got {self.mode!r})")

    def build(self, run_dir: Path, name: str, config: dict):
        import wandb

        # one W&B run per run directory, kept across resumes
        id_file = run_dir / "wandb-id.txt"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(8))
        run_id = id_file.read_text().strip()
        mode = self.mode if self.mode != "auto" else ("online" if wandb_key_available() else "offline")
        common = dict(
            project=self.project,
            entity=self.entity,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            tags=list(self.tags),
        )
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=self.init_timeout, silent=True), **common)
        except Exception as error:  # no network, server down, bad key: log locally instead
            if mode == "offline":
                raise
            log.warning("W&B online init failed (%s); logging offline in %s", error, run_dir / "wandb")
            wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
            run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **common)
        return ResilientWandbLogger(experiment=run, save_dir=str(run_dir))


class ResilientWandbLogger(WandbLogger):
    """Lightning's WandbLogger, whose calls into W&B cannot end the run.

    W&B's service process (wandb-core) exits on SIGTERM, and Slurm sends SIGTERM to every process of the job step
    (scancel, the time limit, preemption; wandb/wandb#9963). Every later call into wandb then raises, and the run
    would crash before it writes the checkpoint the signal asked for. Here the first failure is logged and W&B
    logging stops for this process; metrics.csv keeps every row, and the resumed run continues the same W&B run.
    """

    failed = False

    def _guarded(self, call, *args, **kwargs):
        if self.failed:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as error:  # a broken pipe to a dead service, mostly
            self.failed = True
            log.warning("W&B logging stopped (%s: %s); metrics.csv has every row", type(error).__name__, error)
            return None

    def log_metrics(self, metrics, step=None):
        return self._guarded(super().log_metrics, metrics, step)

    def log_video(self, *args, **kwargs):
        return self._guarded(super().log_video, *args, **kwargs)

    def finalize(self, status):
        return self._guarded(super().finalize, status)

    def finish(self) -> None:
        """End the W&B run (train.py, at the end)."""
        self._guarded(self.experiment.finish)


@dataclass
class NoLogger:
    """logger=none: metrics.csv only."""

    def build(self, run_dir: Path, name: str, config: dict):
        return None
