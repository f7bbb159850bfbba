"""The run's callbacks, built in one place, in the order Lightning calls them.

Each callback lives with its job: checkpointing.py, preemption.py, metrics_log.py, throughput.py (training
metrics), nonfinite.py, evaluation.py (held-out loss, sample videos), quality.py (Moving Digits),
sharding_report.py, and datamodule.py (the stream position, next to the stream tracker).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lightning as L

from vdm.evaluation.moving_digits import prompt_set
from vdm.training.checkpointing import Checkpointing
from vdm.training.datamodule import StreamPosition
from vdm.training.evaluation import HeldOutLoss, SampleVideos
from vdm.training.metrics_log import MetricsLog
from vdm.training.nonfinite import NonFiniteGuard
from vdm.training.preemption import Preemption, StopRequests
from vdm.training.quality import MovingDigitsQuality
from vdm.training.run_dir import RunDir
from vdm.training.sharding_report import ShardingReport
from vdm.training.throughput import TrainMetrics


@dataclass
class RunCallbacks:
    """The callbacks of one run; those the end-of-run summary reads are named."""

    metrics_log: MetricsLog
    held_out: HeldOutLoss | None
    quality: MovingDigitsQuality | None
    preemption: Preemption
    all: list[L.Callback]


def run_callbacks(parts, run_dir: RunDir, stop_requests: StopRequests) -> RunCallbacks:
    """Every callback of a training run, from its built parts (train.py's Parts)."""
    data, settings = parts.data, parts.trainer
    metrics_log = MetricsLog(run_dir.metrics)
    held_out = HeldOutLoss(data, metrics_log, settings.eval_every_n_steps) if data.eval_shard_list else None
    quality = moving_digits_quality(parts, metrics_log, run_dir) if parts.evaluation.enabled else None
    checkpointing = Checkpointing(
        run_dir, settings.checkpoint_every_n_steps, settings.keep_last_checkpoints, settings.keep_every_n_steps
    )
    preemption = Preemption(checkpointing, stop_requests)
    callbacks = [
        StreamPosition(),
        ShardingReport(run_dir),
        TrainMetrics(metrics_log, settings.log_every_n_steps, peak_flops_per_device=settings.peak_flops_per_device),
        NonFiniteGuard(run_dir, metrics_log, settings.max_nonfinite_steps_in_row),  # before a save at this step
        *([held_out] if held_out else []),
        *([quality] if quality else []),
        SampleVideos(
            run_dir,
            parts.sampling,
            num_frames=data.num_frames,
            size=data.sample_size,
            every_n_steps=settings.sample_every_n_steps,
        ),
        checkpointing,
        preemption,
        metrics_log,  # last: flushes what the others logged at this step
    ]
    return RunCallbacks(metrics_log, held_out, quality, preemption, callbacks)


def moving_digits_quality(parts, metrics_log: MetricsLog, run_dir: RunDir) -> MovingDigitsQuality:
    """The Moving Digits evaluation, sampling at the training clips' shape with the run's sampling settings."""
    data, evaluation = parts.data, parts.evaluation
    settings = dataclasses.replace(parts.sampling, prompts=[], weights="ema")

    def sample(module, prompts, first_index):
        shape = {"num_frames": data.num_frames, "size": data.sample_size, "first_index": first_index}
        return module.sample(prompts, **shape, settings=settings, ema=evaluation.weights == "ema")

    return MovingDigitsQuality(
        sample,
        metrics_log,
        evaluation.every_n_steps,
        prompts=prompt_set()[: evaluation.num_prompts],
        batch_size=evaluation.batch_size,
        at_start=evaluation.at_start,
        clips_dir=run_dir.samples,
    )
