"""W&B never hangs a run and never writes the key: offline without a key, fallback when online fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SENTINEL = "vdmsentinel" + "0123456789abcdef0123456789abcdef0"  # 40 characters, the length of a W&B key


def test_online_without_a_reachable_server_falls_back_offline_and_never_writes_the_key(tmp_path):
    # a subprocess: wandb keeps global state, and the key must come from the environment only
    script = textwrap.dedent(f"""
        from pathlib import Path
        import vdm
        from vdm.training.loggers import Wandb
        logger = Wandb(mode="online", init_timeout=5).build(Path({str(tmp_path)!r}), "sentinel", {{"lr": 0.1}})
        logger.log_metrics({{"train/loss": 1.0}}, step=1)
        print("MODE", logger.experiment.settings.mode)
        logger.experiment.finish()
    """)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "WANDB_API_KEY": SENTINEL,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MODE offline" in result.stdout
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), f"the W&B key leaked into {path}"
    assert SENTINEL not in result.stdout + result.stderr
