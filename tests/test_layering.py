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


ROOT = VDM.parent
HYDRA_HOMES = {"train.py", "vdm/command_line.py"}  # the command line; scripts build parts through command_line
# what only vdm/distributed may ask of a strategy: its engine, its sharded tensors, its type
STRATEGY_QUESTIONS = ("deepspeed_engine", "ds_tensor", "ds_numel", "to_local(", "full_tensor(", ".stage", '"FSDP2"')


def project_files() -> list[Path]:
    return [ROOT / "train.py", *sorted(VDM.rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hydra_only_reads_the_command_line(path):
    uses = {m for m in imported_modules(path) if m.split(".")[0] in ("hydra", "omegaconf")}
    assert not uses or str(path.relative_to(ROOT)) in HYDRA_HOMES, f"{path.relative_to(ROOT)} imports {sorted(uses)}"


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_vdm_distributed_asks_what_a_strategy_is(path):
    if path.is_relative_to(VDM / "distributed"):
        return
    code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())  # comments may name them
    asked = [question for question in STRATEGY_QUESTIONS if question in code]
    assert not asked, f"{path.relative_to(ROOT)} asks {asked}: ask vdm.distributed (parallel.py, the settings)"


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_no_script_imports_another_script(path):
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    imported = {m for m in imported_modules(path) if m.split(".")[0] in scripts | {"scripts"}}
    assert "sys.path.insert" not in path.read_text() and not imported, f"{path.name} imports {sorted(imported)}"


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_vdm_text_imports_open_clip(path):
    # open_clip's registry, seeding and logging are set up in vdm/text/open_clip_models.py; others build there
    uses = {m for m in imported_modules(path) if m.split(".")[0] == "open_clip"}
    assert not uses or path.is_relative_to(VDM / "text"), f"{path.relative_to(ROOT)} imports {sorted(uses)}"


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_vdm_text_imports_transformers_and_only_vdm_models_reads_diffusers_layouts(path):
    # transformers' import costs seconds: only a run whose config names a T5 encoder pays it; diffusers' tensor
    # layouts are tables in vdm/models/external.py, read without importing diffusers
    modules = {m.split(".")[0] for m in imported_modules(path)}
    assert "transformers" not in modules or path.is_relative_to(VDM / "text"), path.relative_to(ROOT)
    assert "diffusers" not in modules or path.is_relative_to(VDM / "autoencoders"), path.relative_to(ROOT)


def test_the_strategy_rule_sees_questions():
    # guard: the rule finds what it looks for where it is allowed
    assert "deepspeed_engine" in (VDM / "distributed" / "parallel.py").read_text()
