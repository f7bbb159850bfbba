"""One training run from its built parts: the run directory, the module, the callbacks, the strategy, the
logger and the Trainer, then fit, then what came out of it (RunSummary)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vdm.config_check import ConfigError
from vdm.distributed.threads import threads_per_process
from vdm.run_checks import check_global_batch
from vdm.training.callbacks import run_callbacks
from vdm.training.datamodule import VideoDataModule
from vdm.training.module import VideoDiffusion
from vdm.training.preemption import StopRequests
from vdm.training.reshard import prepare_resume
from vdm.training.run_dir import CHECKPOINT, RunDir

log = logging.getLogger("vdm")


@dataclass
class Parts:
    """Everything a run is built from, checked and constructed, before any training starts."""

    config: dict  # the resolved config as plain values
    text_encoder: Any
    autoencoder: Any
    net: Any
    objective: Any
    data: Any
    optim: Any
    trainer: Any
    logger: Any
    sampling: Any
    strategy: Any
    ema: Any
    evaluation: Any
    inflation: dict | None = None  # what init_from's inflation did and measured (vdm.init_from), for the run dir


@dataclass
class RunSummary:
    """What a finished (or preempted) run reports; `log` prints it, train.py's main returns `as_dict()`."""

    run_dir: str
    steps: int
    preempted: bool
    skipped: dict[str, int]
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    quality: tuple[int, dict[str, float]] | None = None  # (step, {"eval/digit_acc": ..., "eval/motion_acc": ...})
    quality_prompts: int = 0

    def as_dict(self) -> dict:
        summary = {"run_dir": self.run_dir, "steps": self.steps, "skipped": self.skipped, "preempted": self.preempted}
        if self.held_out:
            summary |= {"held_out_first": self.held_out[0], "held_out_last": self.held_out[-1]}
        if self.quality:
            figures = self.quality[1]
            summary |= {
                "digit_accuracy": figures["eval/digit_acc"],
                "motion_accuracy": figures["eval/motion_acc"],
                "consistency": figures["eval/consistency"],
            }
        return summary

    def log(self) -> None:
        if self.held_out:
            (first_step, first), (last_step, last) = self.held_out[0], self.held_out[-1]
            log.info("held-out loss: %.4f at step %d -> %.4f at step %d", first, first_step, last, last_step)
        if self.quality:
            step, figures = self.quality
            log.info(
                "generated clips at step %d (%d prompts): digit accuracy %.1f%%, motion accuracy %.1f%%, temporal "
                "consistency %.1f%% (real held-out clips score 98%%, 100%%, 100%%; chance is 10%% and 12.5%%)",
                step,
                self.quality_prompts,
                100 * figures["eval/digit_acc"],
                100 * figures["eval/motion_acc"],
                100 * figures["eval/consistency"],
            )
        log.info("skipped samples: %s", self.skipped)


def fit(parts: Parts, name: str, run_root: Path, stop_requests: StopRequests) -> RunSummary:
    """Train the run `run_root/name` from `parts` (a new run, or resumed as `resume` says) to its end or a stop."""
    config, data, settings = parts.config, parts.data, parts.trainer
    set_threads(settings, data)
    run_dir = RunDir(run_root / name).create()
    try:
        resume_from = run_dir.checkpoint_to_resume(config["resume"])
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"resume: {error}") from error
    # every process runs this (Lightning starts the others with the same command line, SLURM's srun starts them
    # all); what touches the run directory is done once
    from lightning.pytorch.utilities import rank_zero_only  # after vdm: see vdm/_torchvision_compat.py

    is_rank_zero = rank_zero_only.rank == 0
    callbacks = run_callbacks(parts, run_dir, stop_requests)
    if is_rank_zero:
        for partial in run_dir.remove_partial_checkpoints():
            log.warning("removed %s, a checkpoint whose save did not finish", partial)
        run_dir.save_config(config)
        if parts.inflation is not None:
            run_dir.save_inflation(parts.inflation)
        # the rows past the step this run starts from are logged again: drop them (a fresh start drops every
        # row, of an attempt that died before its first checkpoint); one rank, as rewriting at once loses rows
        match = CHECKPOINT.match(resume_from.name) if resume_from is not None else None
        callbacks.metrics_log.truncate_after(int(match.group(1)) if match else -1)

    module = VideoDiffusion(
        parts.net,
        parts.objective,
        parts.text_encoder,
        parts.autoencoder,
        parts.optim,
        seed=config["seed"],
        caption_dropout=settings.caption_dropout,
        parallelize=parts.strategy.parallelize,
        ema=parts.ema,
        sequence_parallel_size=parts.strategy.sequence_parallel_size,
    )
    strategy = parts.strategy.build(settings.world_size(), data.batch_size)
    # on another number of processes: if it can
    prepare_resume(resume_from, settings.world_size(), strategy, ema=parts.ema is not None and parts.ema.enabled)
    logger = parts.logger.build(run_dir.path, name, config) if is_rank_zero else None
    trainer = settings.build(callbacks.all, logger, strategy=strategy)
    log.info("run directory %s; %s", run_dir.path, f"resuming from {resume_from}" if resume_from else "new run")
    sequence_parallel = parts.strategy.sequence_parallel_size
    log.info(
        "model: %.2fM parameters; global batch %d = %d clips x %d accumulated x %d processes%s",
        sum(p.numel() for p in parts.net.parameters()) / 1e6,
        check_global_batch(settings, data, sequence_parallel),
        data.batch_size,
        settings.accumulate_grad_batches,
        settings.world_size() // sequence_parallel,
        f" (x {sequence_parallel} sharing each clip, split by frames)" if sequence_parallel > 1 else "",
    )
    # a resumed run continues the data stream where its checkpoint stood (the position is in it)
    datamodule = VideoDataModule(data, seed=config["seed"])
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    if logger is not None and hasattr(logger, "finish"):
        logger.finish()
    quality = callbacks.quality
    return RunSummary(
        run_dir=str(run_dir.path),
        steps=trainer.global_step,
        preempted=callbacks.preemption.preempted,
        skipped=data.skips.counts(),
        held_out=list(callbacks.held_out.history) if callbacks.held_out else [],
        quality=quality.history[-1] if quality and quality.history else None,
        quality_prompts=len(quality.prompts) if quality else 0,
    )


def set_threads(settings, data) -> None:
    """Intra-op threads of this process (vdm.distributed.threads), and why, in the log."""
    threads, why = threads_per_process(
        settings.threads_per_process, processes_per_node=settings.processes_per_node(), data_workers=data.num_workers
    )
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("intra-op threads per process: %d (%s)", torch.get_num_threads(), why)
