"""W&B never hangs a run and never writes the key: offline without a key, fallback when online fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.runs import run_train, succeeded

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


def test_a_training_run_never_writes_the_key_anywhere(tmp_path):
    """train.py online with a key from the environment (server unreachable, so it falls back offline):
    the key is in no file of the run (config, checkpoints, metrics, W&B files, logs) and in no output."""
    import torch

    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "WANDB_API_KEY": SENTINEL,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }
    args = [
        f"run_root={tmp_path}",
        "name=secret",
        "logger.mode=online",
        "logger.init_timeout=5",
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.progress_bar=false",
        "data.batch_size=2",
        "data.eval_clips=2",
        "data.num_workers=0",
        "sampling.steps=1",
        "sampling.prompts=[the digit 1 moves up]",
        "evaluation=none",
    ]
    result = succeeded(run_train(*args, env=env, timeout=300))
    run = tmp_path / "secret"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (run / "config.yaml") in files and list(run.glob("wandb/offline-run-*/run-*.wandb"))
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), f"the W&B key leaked into {path}"
    for checkpoint in run.glob("checkpoints/*.ckpt"):  # also once unpacked (compressed tensors would hide it)
        state = torch.load(checkpoint, weights_only=False)
        assert SENTINEL not in repr({k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")})
    assert SENTINEL not in result.stdout + result.stderr
