"""metrics.csv: one row per step, values logged at one step merged, rows past a resume point dropped."""

from __future__ import annotations

import csv

import lightning as L

from vdm.training.metrics_log import MetricsLog


def rows(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_values_logged_at_one_step_share_a_row_and_resume_truncates(tmp_path):
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    log = MetricsLog(tmp_path / "metrics.csv")
    log.write(trainer, 0, {"val/loss": 2.0})
    log.write(trainer, 10, {"train/loss": 1.5, "lr": 1e-4})
    log.write(trainer, 10, {"val/loss": 1.4})
    log.write(trainer, 20, {"train/loss": 1.2})
    log.flush()
    written = rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in written] == ["0", "10", "20"]
    assert written[1]["train/loss"] == "1.5" and written[1]["val/loss"] == "1.4" and written[1]["lr"] == "0.0001"
    assert written[0]["train/loss"] == ""

    log.truncate_after(10)  # a run resumed from step 10 logs step 20 again
    assert [r["step"] for r in rows(tmp_path / "metrics.csv")] == ["0", "10"]
    log.write(trainer, 20, {"train/loss": 1.1})
    log.flush()
    assert [(r["step"], r["train/loss"]) for r in rows(tmp_path / "metrics.csv")][-1] == ("20", "1.1")
