"""Training speed: vdm's Lightning run against a plain PyTorch loop over the same model, batches and optimizer.

What the framework costs is the ratio of the two loops' steps per second, measured in one process over the
same pre-made batches (one DataLoader over a list, so pinning and copies are the same), the same network (its
weights reset to the same initial values before every run), the same optimizer settings and the same random
draws: both loops compute the same losses, which `compare` checks. Each run trains `warmup_steps` untimed
steps, then times `steps` steps; the loops alternate, in swapped order every repeat, so that slow drifts of the
machine fall on both; the figures are medians over the repeats.

The plain loop is what VideoDiffusion.training_step, Lightning's automatic optimization and the clipping hook
do, written out: caption dropout, encode, draw t and noise, loss, backward, clip, optimizer and scheduler step,
EMA. It leaves out what vdm adds on purpose: the non-finite vote, the step metrics and every callback.

Shape legend (see vdm/types.py): B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vdm.models.flops import tokens_per_clip, train_flops_per_clip
from vdm.training.checkpointing import Checkpointing
from vdm.training.ema import EMA
from vdm.training.metrics_log import MetricsLog
from vdm.training.module import VideoDiffusion, compute_dtype, drop_captions, step_generators
from vdm.training.nonfinite import NonFiniteGuard
from vdm.training.optim import AdamW
from vdm.training.preemption import Preemption, StopRequests
from vdm.training.run_dir import RunDir
from vdm.training.sharding_report import ShardingReport
from vdm.training.throughput import TrainMetrics, peak_flops
from vdm.training.trainer import TrainerSettings
from vdm.types import VideoBatch

CAPTIONS = [f"the digit {d} moves {way}" for d in range(10) for way in ("up", "down and to the left", "right")]
PRECISIONS = ("32-true", "bf16-mixed")  # what the plain loop reproduces (16-mixed needs a GradScaler)


@dataclass
class Timing:
    warmup_steps: int = 3  # untimed steps at the start of every run (compilation, allocator, caches)
    steps: int = 10  # timed steps per run
    repeats: int = 3  # runs of each loop, alternating

    def __post_init__(self):
        for name in ("warmup_steps", "steps", "repeats"):  # >= 1 warm-up step: the window starts at a step's end
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int (got {getattr(self, name)!r})")


def make_batches(count: int, batch_size: int, channels: int, frames: int, height: int, width: int, seed: int = 0):
    """`count` VideoBatches of random uint8 clips (B, C, T, H, W) with Moving Digits-like captions."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        video = torch.randint(0, 256, (batch_size, channels, frames, height, width), generator=generator)
        captions = [CAPTIONS[(index * batch_size + i) % len(CAPTIONS)] for i in range(batch_size)]
        keys = [f"bench-{index:06d}-{i}" for i in range(batch_size)]
        batches.append(VideoBatch(video.to(torch.uint8), captions, keys, torch.full((batch_size,), 8.0)))
    return batches


def batch_loader(batches: list[VideoBatch]) -> DataLoader:
    """The pre-made batches as a loader both loops read, pinned where a GPU is (as vdm's own loader)."""
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b, pin_memory=torch.cuda.is_available())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Parts:
    """What both loops train, built from one config (scripts/bench_train.py builds them as train.py does)."""

    net: nn.Module
    objective: object
    text_encoder: nn.Module
    autoencoder: nn.Module
    optim: AdamW
    settings: TrainerSettings
    ema: EMA | None = None
    seed: int = 0

    def __post_init__(self):
        if self.settings.resolved_precision() not in PRECISIONS:
            raise ValueError(
                f"trainer.precision: the benchmark's plain loop runs {', '.join(PRECISIONS)} "
                f"(got {self.settings.resolved_precision()})"
            )
        if self.settings.accumulate_grad_batches != 1:
            raise ValueError("trainer.accumulate_grad_batches: the benchmark times one micro-batch per step")
        if self.ema is not None and not self.ema.enabled:
            self.ema = None
        self.initial_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.initial_ema = copy.deepcopy(self.ema)

    def reset(self) -> None:
        """The network and EMA as they were built: every run starts from the same point."""
        with torch.no_grad():
            for name, value in self.net.state_dict().items():
                value.copy_(self.initial_state[name])
        self.net.zero_grad(set_to_none=True)
        self.ema = copy.deepcopy(self.initial_ema)


@dataclass
class Run:
    """One timed run of a loop: seconds of the timed window, and every step's loss (device tensors)."""

    seconds: float
    losses: list[Tensor]
    peak_memory_bytes: int | None
    text_tokens: list[int] = field(default_factory=list)  # the caption length L each step's forward read


# ---------------------------------------------------------------------------------------------- the plain loop


def plain_run(parts: Parts, loader: DataLoader, device: torch.device, timing: Timing) -> Run:
    """The same training, as plain PyTorch: no Lightning, no callbacks."""
    parts.reset()
    net = parts.net.to(device).train()
    parts.text_encoder.to(device)
    parts.autoencoder.to(device)
    if parts.ema is not None:
        parts.ema.to(device)
    optimizer, scheduler = parts.optim.build(net.named_parameters())
    precision = parts.settings.resolved_precision()
    autocast = (
        torch.autocast(device.type, dtype=compute_dtype(precision)) if precision == "bf16-mixed" else nullcontext()
    )
    max_norm = parts.settings.gradient_clip or math.inf
    losses, text_tokens, start = [], [], None
    reset_peak_memory(device)
    for step, batch in enumerate(loader):
        if step == timing.warmup_steps:
            synchronize(device)
            start = time.perf_counter()
        batch = batch.to(device)
        generator, caption_generator = step_generators(device, parts.seed, 0, step)
        captions = drop_captions(batch.captions, parts.settings.caption_dropout, caption_generator)
        with autocast:
            x0 = parts.autoencoder.encode(batch.pixels())
            t, noise = parts.objective.draw(x0, generator)
            cond = parts.text_encoder.encode(captions)
            loss = parts.objective.loss_at(net, x0, cond, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        if parts.ema is not None:
            parts.ema.step(net.named_parameters(), step + 1)
        losses.append(loss.detach())
        text_tokens.append(cond.tokens.shape[1])
        if step + 1 == timing.warmup_steps + timing.steps:
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    del optimizer, scheduler
    return Run(seconds, losses, peak_memory(device), text_tokens)


# ------------------------------------------------------------------------------------------- vdm's own run


class StepClock(L.Callback):
    """Times the window after the warm-up steps and keeps every step's loss; the last callback of the run."""

    def __init__(self, timing: Timing):
        self.timing, self.start, self.end = timing, None, None
        self.losses: list[Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["step"].metrics["train/loss"])
        if trainer.global_step == self.timing.warmup_steps:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
        if trainer.global_step == self.timing.warmup_steps + self.timing.steps:
            synchronize(pl_module.device)
            self.end = time.perf_counter()


def per_step_callbacks(run_dir: RunDir, settings: TrainerSettings) -> list[L.Callback]:
    """The callbacks train.py runs that do work at every step. Held-out loss, samples, evaluation and checkpoint
    saves run at their own intervals and cost the same in any loop; the data-stream tracker needs vdm's loader."""
    metrics_log = MetricsLog(run_dir.metrics)
    checkpointing = Checkpointing(run_dir, 0, settings.keep_last_checkpoints)  # Preemption's: saves on a signal only
    return [
        ShardingReport(run_dir),
        TrainMetrics(metrics_log, settings.log_every_n_steps, peak_flops_per_device=settings.peak_flops_per_device),
        NonFiniteGuard(run_dir, metrics_log, settings.max_nonfinite_steps_in_row),
        Preemption(checkpointing, StopRequests()),
        metrics_log,
    ]


def vdm_run(parts: Parts, loader: DataLoader, device: torch.device, timing: Timing, run_dir: RunDir) -> Run:
    """The same training through VideoDiffusion, vdm's Trainer settings and the per-step callbacks of train.py."""
    parts.reset()
    module = VideoDiffusion(
        parts.net,
        parts.objective,
        parts.text_encoder,
        parts.autoencoder,
        parts.optim,
        seed=parts.seed,
        caption_dropout=parts.settings.caption_dropout,
        ema=parts.ema,
    )
    clock = StepClock(timing)
    settings = copy.copy(parts.settings)
    settings.max_steps = timing.warmup_steps + timing.steps
    settings.accelerator, settings.devices = device.type if device.type == "cpu" else "gpu", 1
    trainer = settings.build([*per_step_callbacks(run_dir, settings), clock], logger=None)
    reset_peak_memory(device)
    trainer.fit(module, train_dataloaders=loader)
    run = Run(clock.end - clock.start, clock.losses, peak_memory(device))
    del trainer, module
    return run


# ------------------------------------------------------------------------------------------------- figures


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul on `device` in `dtype` (median of `repeats`): what this device reaches
    on the easiest dense work, the practical ceiling MFU is also given against."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


@dataclass
class LoopFigures:
    step_seconds: float  # median over the repeats
    steps_per_sec: float
    clips_per_sec: float
    tokens_per_sec: float
    flops_per_sec: float  # model FLOPs (vdm.models.flops) per second
    mfu: float | None  # against the device's dense peak at this precision, where known
    mfu_vs_matmul: float  # against the large matmul measured in this run
    peak_memory_gb: float | None  # CUDA only
    repeat_step_seconds: list[float]


@dataclass
class Comparison:
    device: str
    precision: str
    batch_size: int
    clip: tuple[int, int, int, int]  # (C, T, H, W) of the pixel clips
    tokens_per_clip: int
    flops_per_step: float
    peak_flops: float | None
    matmul_flops: float
    plain: LoopFigures
    vdm: LoopFigures
    overhead_ratio: float  # vdm steps/s / plain steps/s
    losses_equal: bool  # both loops computed the same losses, step by step (first repeat)
    max_loss_difference: float
    losses: list[float]  # the plain loop's, first repeat


def figures(runs: list[Run], steps: int, batch: int, tokens: int, flops: float, peak, matmul) -> LoopFigures:
    per_step = [run.seconds / steps for run in runs]
    step_seconds = statistics.median(per_step)
    rate = flops / step_seconds
    memory = [run.peak_memory_bytes for run in runs if run.peak_memory_bytes is not None]
    return LoopFigures(
        step_seconds=step_seconds,
        steps_per_sec=1 / step_seconds,
        clips_per_sec=batch / step_seconds,
        tokens_per_sec=batch / step_seconds * tokens,
        flops_per_sec=rate,
        mfu=rate / peak if peak else None,
        mfu_vs_matmul=rate / matmul,
        peak_memory_gb=max(memory) / 2**30 if memory else None,
        repeat_step_seconds=per_step,
    )


def compare(parts: Parts, batches: list[VideoBatch], device: torch.device, timing: Timing, work_dir: Path):
    """Both loops, alternating, over `batches` (at least warmup + steps of them): a Comparison."""
    if len(batches) < timing.warmup_steps + timing.steps:
        raise ValueError(f"need {timing.warmup_steps + timing.steps} batches, got {len(batches)}")
    loader = batch_loader(batches)
    run_dir = RunDir(Path(work_dir)).create()
    plain_runs, vdm_runs = [], []
    for repeat in range(timing.repeats):
        order = ("plain", "vdm") if repeat % 2 == 0 else ("vdm", "plain")
        for loop in order:
            if loop == "plain":
                plain_runs.append(plain_run(parts, loader, device, timing))
            else:
                vdm_runs.append(vdm_run(parts, loader, device, timing, run_dir))

    C, T, H, W = batches[0].video.shape[1:]
    latent = parts.autoencoder.encode(batches[0].pixels()[:1].to(device)).shape[2:]  # (T, H, W) the net sees
    tokens = tokens_per_clip(parts.net, *latent)
    timed = plain_runs[0].text_tokens[timing.warmup_steps :]
    batch = len(batches[0])
    # the same batches and draws in every run: the same caption lengths, so the same FLOPs, in both loops
    flops = statistics.fmean(batch * train_flops_per_clip(parts.net, *latent, length) for length in timed)
    precision = parts.settings.resolved_precision()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_flops(name, precision) if device.type == "cuda" else None
    peak = parts.settings.peak_flops_per_device or peak
    matmul = matmul_flops(device, compute_dtype(precision))
    plain_losses = torch.stack(plain_runs[0].losses).float().cpu()
    vdm_losses = torch.stack(vdm_runs[0].losses).float().cpu()
    plain = figures(plain_runs, timing.steps, batch, tokens, flops, peak, matmul)
    ours = figures(vdm_runs, timing.steps, batch, tokens, flops, peak, matmul)
    return Comparison(
        device=name,
        precision=precision,
        batch_size=batch,
        clip=(C, T, H, W),
        tokens_per_clip=tokens,
        flops_per_step=flops,
        peak_flops=peak,
        matmul_flops=matmul,
        plain=plain,
        vdm=ours,
        overhead_ratio=ours.steps_per_sec / plain.steps_per_sec,
        losses_equal=plain_losses.shape == vdm_losses.shape and torch.equal(plain_losses, vdm_losses),
        max_loss_difference=float((plain_losses - vdm_losses).abs().max()),
        losses=plain_losses.tolist(),
    )
