"""Evaluation during training: the held-out loss, and sample videos for fixed prompts (the Moving Digits
quality evaluation: quality.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from vdm.data import VideoData
from vdm.data.video import encode_gif, encode_mp4
from vdm.generate import SamplingSettings, grid, to_uint8_frames
from vdm.seeding import generator_for
from vdm.training.metrics_log import MetricsLog
from vdm.training.run_dir import RunDir
from vdm.training.shares import spread
from vdm.training.steps import StepBoundary

log = logging.getLogger(__name__)


class HeldOutLoss(L.Callback):
    """The objective on a fixed set of held-out clips, at fixed timesteps and noise.

    Fixed t (a stratified grid over (0, 1)) and fixed noise remove the sampling noise of the
    training loss, so values at different steps compare directly. Computed at step 0, every
    `every_n_steps` and at the end. With an EMA, the EMA weights are the ones evaluated.
    Every rank reads the same held-out batches and computes the loss of its share of them; the value does
    not depend on the number of processes.
    """

    def __init__(
        self, data: VideoData, metrics_log: MetricsLog, every_n_steps: int, seed: int = 1234, ema: bool = True
    ):
        self.data, self.metrics_log, self.every_n_steps, self.seed = data, metrics_log, every_n_steps, seed
        self.ema = ema  # evaluate the EMA weights when the run keeps an EMA
        self.batches: list | None = None
        self.last_step = -1
        self.history: list[tuple[int, float]] = []  # (step, held-out loss)
        self.boundary = StepBoundary()

    def on_train_start(self, trainer, pl_module) -> None:
        self.boundary.start(trainer)
        if trainer.global_step == 0:  # a resumed run logged its starting point before it stopped
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.boundary.crossed(trainer):
            return
        # the last step here too: its held-out loss joins its row before a checkpoint at that step writes the row
        last = trainer.global_step >= trainer.max_steps
        if last or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step >= trainer.max_steps:  # not when stopped early (preempted): the resumed run will
            self.evaluate(trainer, pl_module)

    def held_out_batches(self) -> list:
        if self.batches is None:
            self.batches, clips = [], 0
            for batch in self.data.eval_loader():
                self.batches.append(batch)
                clips += len(batch)
                if clips >= self.data.eval_clips:
                    break
        return self.batches

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> float:
        if trainer.global_step == self.last_step:
            return float("nan")
        self.last_step = trainer.global_step
        was_training = pl_module.net.training
        pl_module.net.eval()
        batches = self.held_out_batches()
        num_clips = sum(len(b) for b in batches)
        with pl_module.eval_weights(self.ema):
            total, count = self.total_loss(trainer, pl_module, batches, num_clips)
        pl_module.net.train(was_training)
        value = total / count
        self.history.append((trainer.global_step, value))
        self.metrics_log.write(trainer, trainer.global_step, {"val/loss": value})
        log.info(
            "step %d: held-out loss %.5f over %d clips%s (%d of %d batches on this rank)",
            trainer.global_step,
            value,
            count,
            " (EMA weights)" if self.ema and pl_module.ema is not None else "",
            sum(i is not None for i in spread(len(batches), pl_module.data_world_size, pl_module.data_rank)),
            len(batches),
        )
        return value

    def total_loss(self, trainer, pl_module, batches: list, num_clips: int) -> tuple[float, int]:
        """(sum of the per-clip losses, clips): the batches split over the ranks (vdm.training.shares.spread),
        batch i at its own fixed t and noise, so each batch's loss is what one process computes for it; each sum
        comes from exactly one rank, so adding them up over ranks is exact, and the total adds them in order.
        Under sequence parallelism the batches go to the data-parallel replicas: every rank of a sequence-parallel
        group computes the same sums (its forwards are collective), so the reduced sums count each of them
        sequence_parallel_size times."""
        offsets = [0]
        for batch in batches:
            offsets.append(offsets[-1] + len(batch))
        sums = torch.zeros(len(batches), dtype=torch.float64, device=pl_module.device)
        for index in spread(len(batches), pl_module.data_world_size, pl_module.data_rank):
            batch = batches[index if index is not None else 0].to(pl_module.device)  # None: a spare forward
            generator = generator_for(pl_module.device, self.seed, index or 0)
            start = offsets[index or 0]
            t = (torch.arange(start, start + len(batch), device=pl_module.device) + 0.5) / num_clips
            with trainer.precision_plugin.forward_context():
                losses, _ = pl_module.losses(batch, generator, t=t)  # the training step's loss, at fixed t
            if index is not None:
                sums[index] = losses.double().sum()
        sums = trainer.strategy.reduce(sums, reduce_op="sum").cpu() / pl_module.sequence_parallel_size
        return sum(sums.tolist()), offsets[-1]


class SampleVideos(L.Callback):
    """Videos for fixed prompts and seeds: samples/step-<N>.mp4, .gif and .txt (the prompts), and W&B."""

    def __init__(
        self,
        run_dir: RunDir,
        settings: SamplingSettings,
        *,
        num_frames: int,
        size: int,
        every_n_steps: int = 0,
        columns: int = 4,
        upscale: int = 4,
    ):
        self.run_dir, self.settings = run_dir, settings
        self.num_frames, self.size = num_frames, size
        self.every_n_steps, self.columns, self.upscale = every_n_steps, columns, upscale
        self.last_step = -1
        self.boundary = StepBoundary()

    def on_train_start(self, trainer, pl_module) -> None:
        self.boundary.start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        crossed = self.boundary.crossed(trainer)
        if crossed and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step >= trainer.max_steps:  # not when stopped early (preempted): the resumed run will
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module) -> Path | None:
        settings = self.settings
        if not settings.prompts or trainer.global_step == self.last_step:
            return None
        # every rank generates: with sharded parameters (FSDP2, ZeRO-3) each forward gathers them collectively;
        # rank 0 writes
        self.last_step = trainer.global_step
        was_training = pl_module.net.training
        pl_module.net.eval()
        columns = self.columns
        with trainer.precision_plugin.forward_context():
            shape = {"num_frames": self.num_frames, "size": self.size, "settings": settings}
            video = pl_module.sample(settings.prompts, **shape, ema=settings.weights != "raw")
            if settings.weights == "both" and pl_module.ema is not None:  # each row: EMA clip, raw-weights clip
                raw = pl_module.sample(settings.prompts, **shape, ema=False)
                video, columns = torch.stack([video, raw], dim=1).flatten(0, 1), 2
        pl_module.net.train(was_training)
        if not trainer.is_global_zero:
            return None
        frames = grid(to_uint8_frames(video), columns, self.upscale)
        stem = self.run_dir.samples / f"step-{trainer.global_step:09d}"
        fps = max(1, round(settings.fps))
        stem.with_suffix(".mp4").write_bytes(encode_mp4(frames, fps))
        stem.with_suffix(".gif").write_bytes(encode_gif(frames, fps))
        stem.with_suffix(".txt").write_text("\n".join(settings.prompts) + "\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_video"):  # WandbLogger
                logger.log_video(
                    "samples",
                    [str(stem.with_suffix(".mp4"))],
                    step=trainer.global_step,
                    caption=[" | ".join(settings.prompts)],
                )
        log.info("step %d: samples written to %s.{mp4,gif,txt}", trainer.global_step, stem)
        return stem
