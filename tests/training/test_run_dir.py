"""Run directories: only complete checkpoints are resumed; partial saves are ignored and removed."""

from __future__ import annotations

import pytest

from vdm.training.run_dir import RunDir


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    return RunDir(tmp_path / "run").create()


def test_resume_auto_takes_the_latest_complete_checkpoint_and_ignores_partial_ones(run_dir):
    assert run_dir.checkpoint_to_resume("auto") is None
    for step in (100, 300, 200):
        run_dir.checkpoint_path(step).write_bytes(b"x")
    partial = run_dir.checkpoints / "step-000000400.ckpt.partial"  # a save killed mid-write
    partial.mkdir()
    (partial / "shard").write_bytes(b"half")
    assert run_dir.checkpoint_to_resume("auto") == run_dir.checkpoint_path(300)
    assert run_dir.remove_partial_checkpoints() == [partial]
    assert not partial.exists()
    assert [step for step, _ in run_dir.complete_checkpoints()] == [100, 200, 300]


def test_resume_never_refuses_to_overwrite_a_run_with_checkpoints(run_dir):
    assert run_dir.checkpoint_to_resume("never") is None
    run_dir.checkpoint_path(10).write_bytes(b"x")
    with pytest.raises(ValueError, match="resume=never"):
        run_dir.checkpoint_to_resume("never")


def test_resume_from_an_explicit_path(run_dir, tmp_path):
    elsewhere = tmp_path / "other.ckpt"
    elsewhere.write_bytes(b"x")
    assert run_dir.checkpoint_to_resume(str(elsewhere)) == elsewhere
    with pytest.raises(FileNotFoundError):
        run_dir.checkpoint_to_resume(str(tmp_path / "missing.ckpt"))


def test_only_incomplete_checkpoints_stop_the_run_instead_of_starting_over(run_dir):
    (run_dir.checkpoints / "step-000000100.ckpt.partial").write_bytes(b"half")
    with pytest.raises(ValueError, match="only incomplete checkpoints"):
        run_dir.checkpoint_to_resume("auto")
    assert run_dir.checkpoint_to_resume("never") is None  # the explicit way to start over
