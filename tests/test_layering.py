"""The rule that holds the layers apart: the pure-PyTorch packages never import the training stack."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

VDM = Path(__file__).resolve().parents[1] / "vdm"
PURE = [
    "models",
    "diffusion",
    "text",
    "autoencoders",
    "data",
    "evaluation",
    "types.py",
    "generate.py",
    "config_check.py",
    "state_dicts.py",
    "seeding.py",
    "signals.py",
]
FORBIDDEN = ("lightning", "pytorch_lightning", "deepspeed", "hydra", "omegaconf", "wandb", "torch.distributed")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def pure_files() -> list[Path]:
    files = []
    for entry in PURE:
        path = VDM / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(VDM)))
def test_pure_layers_do_not_import_the_training_stack(path):
    bad = {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{path.relative_to(VDM.parent)} imports {sorted(bad)}"


def test_the_walk_sees_imports():
    # guard against a walker that finds nothing: the training package does import lightning
    assert "lightning" in imported_modules(VDM / "training" / "module.py")
    assert len(pure_files()) >= 15
