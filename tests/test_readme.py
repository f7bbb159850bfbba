"""The README's two commands are the ones that work: CI runs the second verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
    install_and_train, install_and_test = readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci
    assert install_and_train.endswith("python train.py")
    assert install_and_test.endswith("python -m pytest")
    # both install with the constraints file, so torch stays pinned
    assert "-c constraints.txt" in install_and_train and "-c constraints.txt" in install_and_test


def test_the_first_commands_training_runs_from_a_clean_copy(tmp_path):
    """`python train.py` as the README's first command runs it, in a copy of only the files git tracks: nothing it
    needs (bundled data, configs, encoder configs) lives outside the repository. It trains, evaluates,
    checkpoints, samples and scores as the full command does, and logs W&B offline; only smaller: 3 steps instead
    of 1,200, each logged, 2 sampling steps instead of 25, 16 held-out clips and 8 scored prompts."""
    import subprocess

    from tests.runs import run_train, succeeded, train_env, train_losses

    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    copy = tmp_path / "clone"
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((ROOT / name).read_bytes())
    steps = ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.eval_every_n_steps=3"]
    steps += ["trainer.checkpoint_every_n_steps=3", "sampling.steps=2", "data.eval_clips=16"]
    steps += ["evaluation.num_prompts=8", "evaluation.batch_size=8"]
    result = succeeded(run_train(*steps, cwd=copy, env=train_env(HOME=str(tmp_path)), timeout=900))
    (run,) = (copy / "runs").iterdir()  # the default name: a timestamp
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000003.ckpt"]
    assert list((run / "samples").rglob("*.mp4")) and list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert "digit" in result.stdout + result.stderr  # the Moving Digits score is reported
