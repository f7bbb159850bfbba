"""Experiment loggers from settings. W&B never hangs a run: without a key or a network it runs offline."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

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
        from lightning.pytorch.loggers import WandbLogger

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
        return WandbLogger(experiment=run, save_dir=str(run_dir))


@dataclass
class NoLogger:
    """logger=none: metrics.csv only."""

    def build(self, run_dir: Path, name: str, config: dict):
        return None
