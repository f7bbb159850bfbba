"""Measured sample quality during training: digit and motion accuracy on Moving Digits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from vdm.data.video import encode_mp4
from vdm.evaluation.moving_digits import DigitClassifier, prompt_set, score, training_classifier
from vdm.generate import grid, to_uint8_frames
from vdm.training.metrics_log import MetricsLog
from vdm.training.shares import spread
from vdm.training.steps import StepBoundary

log = logging.getLogger(__name__)


# (pl_module, prompts, first_index) -> (N, C, T, H, W) float in [-1, 1], one clip per prompt, prompt i's noise
# seeded with first_index + i: e.g. a closure over vdm.generate.generate with the run's sampling settings.
GenerateFn = Callable[[L.LightningModule, list[str], int], Tensor]


@dataclass
class MovingDigitsEvaluation:
    """Config of the Moving Digits evaluation (conf/evaluation): when it runs and how many clips at once."""

    enabled: bool = True
    every_n_steps: int = 0  # 0: at the last step only; each evaluation samples num_prompts clips
    at_start: bool = False  # also before the first step (of a new run): the untrained baseline
    num_prompts: int = 80  # the first this many of the 80 fixed prompts (digit-major): fewer for a quick look
    batch_size: int = 16  # prompts sampled together
    weights: str = "ema"  # ema (the raw weights while a run has no EMA) or raw

    def __post_init__(self):
        if not 1 <= self.num_prompts <= len(prompt_set()):
            raise ValueError(f"num_prompts must be in [1, {len(prompt_set())}] (got {self.num_prompts})")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"weights must be ema or raw (got {self.weights!r})")
        if self.every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (got {self.every_n_steps})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")


class MovingDigitsQuality(L.Callback):
    """Generates a clip for each fixed prompt (vdm.evaluation.moving_digits.prompt_set: every digit x every
    direction) and logs the share that draws the prompted digit (eval/digit_acc) and moves the prompted
    way (eval/motion_acc), every `every_n_steps` and at the last step.

    The prompts are split over the ranks, `batch_size` at a time: chunk k goes to rank k mod world size. Each
    prompt's noise is seeded by its index, and the chunks are the same whatever the number of processes, so the
    clips (and the figures) do not depend on it. With sharded parameters (FSDP2, ZeRO-3) every forward is
    collective: a rank left without a chunk in the last round generates a spare one and drops it, so that all
    ranks run the same forwards. The clips are summed over ranks (each from exactly one, so the sum is exact) and
    rank 0 scores and writes. The network is put in eval mode and run under the trainer's precision; which weights
    (EMA or not) and which sampler settings is `generate_fn`'s choice.
    """

    METRICS = ("eval/digit_acc", "eval/motion_acc", "eval/consistency")

    def __init__(
        self,
        generate_fn: GenerateFn,
        metrics_log: MetricsLog,
        every_n_steps: int,
        prompts: list[str] | None = None,
        batch_size: int = 16,
        classifier: DigitClassifier | None = None,
        at_start: bool = False,
        clips_dir: Path | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.generate_fn, self.metrics_log, self.every_n_steps = generate_fn, metrics_log, every_n_steps
        self.prompts = list(prompts) if prompts is not None else prompt_set()
        self.batch_size = batch_size  # prompts per generate_fn call: bounds the memory of one sampling run
        self.classifier = classifier  # None: the one fit on the training scans, built when first needed
        self.at_start = at_start
        self.clips_dir = clips_dir  # where rank 0 writes eval-step-<N>.mp4, the clips it scored (None: nowhere)
        self.last_step = -1
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, {"eval/digit_acc": ..., ...})
        self.boundary = StepBoundary()

    def on_train_start(self, trainer, pl_module) -> None:
        self.boundary.start(trainer)
        if self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.boundary.crossed(trainer):
            return
        # the last step here too, so its figures join its metrics.csv row before a checkpoint writes the row
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if last or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # not when stopped early (preempted): the resumed run will
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self.evaluate(trainer, pl_module)

    @property
    def chunks(self) -> int:
        return -(-len(self.prompts) // self.batch_size)

    @torch.no_grad()
    def generate(self, trainer: L.Trainer, pl_module) -> Tensor:
        """(len(prompts), C, T, H, W) float in [-1, 1] on the CPU, on every rank; each rank generates its share."""
        was_training = pl_module.net.training
        pl_module.net.eval()
        starts = list(range(0, len(self.prompts), self.batch_size))
        videos = None
        try:
            for index in spread(len(starts), trainer.world_size, trainer.global_rank):
                first = starts[index if index is not None else 0]  # None: a spare chunk, generated and dropped
                with trainer.precision_plugin.forward_context():
                    video = self.generate_fn(pl_module, self.prompts[first : first + self.batch_size], first)
                if videos is None:
                    videos = video.new_zeros((len(self.prompts), *video.shape[1:]), dtype=torch.float32)
                if index is not None:
                    videos[first : first + len(video)] = video.float()
        finally:
            pl_module.net.train(was_training)
        return trainer.strategy.reduce(videos, reduce_op="sum").cpu()

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float] | None:
        if trainer.global_step == self.last_step:
            return None
        self.last_step = trainer.global_step
        videos = self.generate(trainer, pl_module)  # every rank: sampling may be collective
        if not trainer.is_global_zero:
            return None
        if self.classifier is None:
            self.classifier = training_classifier()
        figures = score(videos, self.prompts, self.classifier)
        if self.clips_dir is not None:
            frames = grid(to_uint8_frames(videos), columns=8, upscale=2)
            (self.clips_dir / f"eval-step-{trainer.global_step:09d}.mp4").write_bytes(encode_mp4(frames, fps=4))
        values = {f"eval/{key}": figures[key] for key in ("digit_acc", "motion_acc", "consistency")}
        self.history.append((trainer.global_step, values))
        self.metrics_log.write(trainer, trainer.global_step, values)
        log.info(
            "step %d: digit accuracy %.1f%%, motion accuracy %.1f%%, temporal consistency %.1f%% over %d prompts "
            "(%d of %d chunks on rank 0)",
            trainer.global_step,
            100 * values["eval/digit_acc"],
            100 * values["eval/motion_acc"],
            100 * values["eval/consistency"],
            len(self.prompts),
            sum(i is not None for i in spread(self.chunks, trainer.world_size, 0)),
            self.chunks,
        )
        return values
