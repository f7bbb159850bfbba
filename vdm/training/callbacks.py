"""Callbacks: checkpoints, the metrics file, held-out loss, sample videos (training metrics: throughput.py)."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch

from vdm.data import VideoData
from vdm.data.video import encode_gif, encode_mp4
from vdm.generate import SamplingSettings, grid, to_uint8_frames
from vdm.seeding import generator_for
from vdm.training.checkpoint_io import fsync_directory
from vdm.training.nonfinite import check_finite_weights
from vdm.training.run_dir import RunDir
from vdm.training.shares import spread
from vdm.training.steps import StepBoundary

log = logging.getLogger(__name__)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, ...); the previous complete one is untouched."""


class Checkpointing(L.Callback):
    """Save every `every_n_steps` and at the end, atomically; keep the newest `keep_last` and every `keep_every`-th.

    Each checkpoint is written to `<name>.partial` and renamed to its final name only once every rank
    has finished writing, so a crash mid-save never leaves a checkpoint that looks complete.
    """

    def __init__(self, run_dir: RunDir, every_n_steps: int, keep_last: int = 2, keep_every: int = 0):
        self.run_dir, self.every_n_steps, self.keep_last, self.keep_every = (
            run_dir,
            every_n_steps,
            keep_last,
            keep_every,
        )
        self.last_saved_step = -1
        self.boundary = StepBoundary()

    def on_train_start(self, trainer, pl_module) -> None:
        self.boundary.start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        crossed = self.boundary.crossed(trainer)  # never in the middle of a gradient accumulation
        if crossed and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self.last_saved_step:
            return
        check_finite_weights(trainer, trainer.lightning_module, step)
        final = self.run_dir.checkpoint_path(step)
        partial = final.with_name(final.name + ".partial")
        # Trainer.save_checkpoint with the write guarded: a rank whose write fails must still meet the others at
        # the barrier they wait in (the checkpoint state is collected from every rank; under DDP rank 0 writes)
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        error = None
        try:
            trainer.strategy.save_checkpoint(checkpoint, partial)
        except OSError as caught:  # a full disk (ENOSPC), a quota (EDQUOT), a file-size limit (EFBIG), ...
            error = caught
        del checkpoint
        trainer.strategy.barrier("Trainer.save_checkpoint")
        # the ranks agree on the outcome, so they stop together rather than some waiting forever for the others
        flag = torch.tensor(float(error is not None), device=trainer.lightning_module.device)
        failed = trainer.strategy.reduce(flag, reduce_op="sum").item() > 0
        if failed:
            if trainer.is_global_zero and partial.exists():
                shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
            previous = self.run_dir.complete_checkpoints()
            raise CheckpointWriteError(
                f"the checkpoint of step {step} could not be written"
                + (f" ({error})" if error is not None else " (on another rank)")
                + "; "
                + (
                    f"{previous[-1][1]} is intact and the same command resumes from it"
                    if previous
                    else "there is no earlier checkpoint"
                )
            ) from error
        trainer.strategy.barrier("checkpoint-written")
        if trainer.is_global_zero:
            os.replace(partial, final)
            fsync_directory(final.parent)
            for old_step, old in self.run_dir.complete_checkpoints()[: -self.keep_last]:
                if self.keep_every and old_step % self.keep_every == 0:
                    continue  # a milestone: kept for good
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        trainer.strategy.barrier("checkpoint-renamed")
        self.last_saved_step = step


class StreamPosition(L.Callback):
    """Records each trained batch's data-stream position in the data module (saved with checkpoints)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.tracker.update(batch)


class MetricsLog(L.Callback):
    """metrics.csv, one row per logged step, and the same numbers to the experiment loggers.

    Values logged at the same step (training metrics, held-out loss) are merged into one row, written
    when the next step is logged, at each checkpoint and at the end.
    """

    COLUMNS = (  # the columns added later come last, so older files keep the positions of theirs
        *("step", "train/loss", "val/loss", "lr", "grad_norm", "clips_per_sec", "data_wait"),
        *("tokens_per_sec", "mfu", "peak_gpu_mem_gb"),
        *("train/loss_t0", "train/loss_t1", "train/loss_t2", "train/loss_t3"),
        *("nonfinite_steps",),
        *("eval/digit_acc", "eval/motion_acc"),
    )

    def __init__(self, path: Path):
        self.path = path
        self.pending_step: int | None = None
        self.pending: dict[str, float] = {}
        self.callbacks_done_at: float | None = None  # when the last step's callbacks finished (it runs last)

    def write(self, trainer: L.Trainer, step: int, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        if step != self.pending_step:
            self.flush()
            self.pending_step = step
        self.pending |= metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def flush(self) -> None:
        if self.pending_step is None:
            return
        new_file = not self.path.exists()
        with open(self.path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({"step": self.pending_step} | {k: f"{v:.6g}" for k, v in self.pending.items()})
        self.pending_step, self.pending = None, {}

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a run resumed from that step logs them again."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as file:
            rows = list(csv.DictReader(file))
        with open(self.path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(row for row in rows if int(row["step"]) <= step)

    def on_train_start(self, trainer, pl_module) -> None:
        self.callbacks_done_at = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.callbacks_done_at = time.perf_counter()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            self.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.flush()


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
            sum(i is not None for i in spread(len(batches), trainer.world_size, trainer.global_rank)),
            len(batches),
        )
        return value

    def total_loss(self, trainer, pl_module, batches: list, num_clips: int) -> tuple[float, int]:
        """(sum of the per-clip losses, clips): the batches split over the ranks (vdm.training.shares.spread),
        batch i at its own fixed t and noise, so each batch's loss is what one process computes for it; each sum
        comes from exactly one rank, so adding them up over ranks is exact, and the total adds them in order."""
        offsets = [0]
        for batch in batches:
            offsets.append(offsets[-1] + len(batch))
        sums = torch.zeros(len(batches), dtype=torch.float64, device=pl_module.device)
        for index in spread(len(batches), trainer.world_size, trainer.global_rank):
            batch = batches[index if index is not None else 0].to(pl_module.device)  # None: a spare forward
            x0 = pl_module.autoencoder.encode(batch.pixels())
            generator = generator_for(pl_module.device, self.seed, index or 0)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            start = offsets[index or 0]
            t = (torch.arange(start, start + len(batch), device=x0.device) + 0.5) / num_clips
            with trainer.precision_plugin.forward_context():
                losses = pl_module.objective.loss_at(pl_module.net, x0, pl_module.encode_text(batch.captions), t, noise)
            if index is not None:
                sums[index] = losses.double().sum()
        sums = trainer.strategy.reduce(sums, reduce_op="sum").cpu()
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


class ShardingReport(L.Callback):
    """What each rank holds after the first optimizer step: parameter and optimizer-state elements.

    Written to sharding/rank-<r>.json in the run directory and logged: under DDP every rank holds
    everything; ZeRO 1/2 split the optimizer states, ZeRO-3 and FSDP2 the parameters too.
    """

    def __init__(self, run_dir: RunDir):
        self.run_dir, self.done = run_dir, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step < 1:
            return
        self.done = True
        params = list(pl_module.net.parameters())
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "parameters_total": sum(_full_numel(p) for p in params),
            "parameters_local": sum(_local_numel(p) for p in params),
            "optimizer_state_local": sum(
                _local_numel(value)
                for state in _innermost_optimizer(trainer.optimizers[0]).state.values()
                for value in state.values()
                if isinstance(value, torch.Tensor) and value.dim() > 0
            ),
        }
        folder = self.run_dir.path / "sharding"
        folder.mkdir(exist_ok=True)
        (folder / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report, indent=1) + "\n")
        log.info(
            "rank %d holds %d of %d parameters and %d optimizer-state elements (%s)",
            report["rank"],
            report["parameters_local"],
            report["parameters_total"],
            report["optimizer_state_local"],
            report["strategy"],
        )


def _local_numel(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank's partition
        return tensor.ds_tensor.numel()
    if hasattr(tensor, "to_local"):  # a DTensor (FSDP2): this rank's shard
        return tensor.to_local().numel()
    return tensor.numel()


def _full_numel(tensor: torch.Tensor) -> int:
    return tensor.ds_numel if hasattr(tensor, "ds_numel") else tensor.numel()


def _innermost_optimizer(optimizer):
    """The torch optimizer that holds the states (Lightning and DeepSpeed wrap it)."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer
