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
