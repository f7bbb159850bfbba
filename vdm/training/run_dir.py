"""A run's directory: runs/<name>/ with config.yaml, checkpoints/, metrics.csv, samples/, wandb/ (inflation.json)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

CHECKPOINT = re.compile(r"^step-(\d{9})\.ckpt$")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    def save_config(self, config: dict) -> None:
        """config.yaml: the run's resolved config, as plain values (what export, sample and a resume read)."""
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def inflation(self) -> Path:
        return self.path / "inflation.json"

    def save_inflation(self, report: dict) -> None:
        """inflation.json: every tensor an image model's weights gave the video model, and the parity check."""
        self.inflation.write_text(json.dumps(report, indent=1) + "\n")

    def create(self) -> RunDir:
        for folder in (self.path, self.checkpoints, self.samples):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:09d}.ckpt"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first.

        A checkpoint is written under a temporary name and renamed when whole, so a name that
        matches `step-NNNNNNNNN.ckpt` is complete; anything else in the folder is not.
        """
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := CHECKPOINT.match(p.name))]
        return sorted(found)

    def partial_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints.glob("*.partial")) if self.checkpoints.is_dir() else []

    def remove_partial_checkpoints(self) -> list[Path]:
        """Delete what a save killed mid-write left behind; returns what was removed."""
        removed = []
        for path in self.partial_checkpoints():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
        return removed

    def checkpoint_to_resume(self, resume: str) -> Path | None:
        """Which checkpoint a run starts from: 'auto' (latest complete, if any), 'never', or a path."""
        if resume == "never":
            if self.complete_checkpoints():
                raise ValueError(
                    f"resume=never, but {self.checkpoints} holds checkpoints: choose another name= or resume=auto"
                )
            return None
        if resume == "auto":
            checkpoints = self.complete_checkpoints()
            if not checkpoints and self.partial_checkpoints():
                # never start silently from step 0 over a run that exists but whose only save did not finish
                raise ValueError(
                    f"{self.checkpoints} holds only incomplete checkpoints "
                    f"({', '.join(p.name for p in self.partial_checkpoints())}): their save did not "
                    "finish. Start over with resume=never (they are then removed)"
                )
            return checkpoints[-1][1] if checkpoints else None
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint")
        return path
