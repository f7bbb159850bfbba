"""Per-interval training metrics: loss (overall and per timestep bucket), learning rate, gradient norm, clips and
tokens per second, model FLOPs utilization (MFU), the share of time spent waiting for data and peak GPU memory.

Metric names (metrics.csv columns and experiment-logger keys):

    train/loss        mean training loss over the ranks at the logged step
    lr, grad_norm     at the logged step (grad_norm before clipping)
    clips_per_sec     clips trained per second, all ranks together, over the interval since the last row
    tokens_per_sec    latent patch tokens the network trained on per second, all ranks together
    mfu               achieved model FLOP/s / (world size x peak FLOP/s of one device); GPUs of the table below
                      or with `peak_flops_per_device` only. With activation checkpointing the recomputed
                      forward counts as work done (strictly, hardware FLOPs utilization)
    data_wait         share of the interval's step time spent waiting for the next batch
    peak_gpu_mem_gb   the most memory the caching allocator held for tensors at once in the interval, GiB
                      (2**30 bytes), the largest over the ranks; CUDA only
    train/loss_t0..3  mean loss of the interval's samples whose timestep t fell in [0, .25), [.25, .5),
                      [.5, .75), [.75, 1] (t = 1 is noise), over all ranks; a bucket no sample fell in is left out
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor

from vdm.distributed.parallel import engine_gradient_norm
from vdm.models.flops import forward_flops, tokens_per_clip, train_flops_per_clip

if TYPE_CHECKING:
    from vdm.training.metrics_log import MetricsLog

log = logging.getLogger(__name__)

NUM_BUCKETS = 4  # timestep buckets of equal width over [0, 1]

# Dense (no structured sparsity) peak tensor-core FLOP/s of one GPU, from NVIDIA's data sheets, by the
# number format matmuls run in. Matched against torch.cuda.get_device_name in this order, so a more
# specific name comes before the one it contains ("H100 PCIe" before "H100"). fp16 runs at the bf16 rate.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM, and GH200's GPU
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),  # SXM4 and PCIe, 40 and 80 GB
]


def matmul_format(precision: str) -> str | None:
    """The number format a Lightning precision runs matmuls in, or None for one with no table entry (fp64)."""
    precision = str(precision)
    if precision.startswith(("bf16", "16")):
        return "bf16"
    if precision.startswith("32"):
        # fp32 matmuls use TF32 tensor cores only when allowed (torch.set_float32_matmul_precision)
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of a GPU named `device_name` at `precision`; None if the GPU is not in the table."""
    number_format = matmul_format(precision)
    for pattern, peaks in PEAK_FLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(number_format) if number_format else None
    return None


class TrainMetrics(L.Callback):
    """Writes the metrics above to the MetricsLog every `every_n_steps` optimizer steps.

    A step's time is its compute (batch start to batch end) plus the wait for its batch (from the end of
    the previous step's callbacks to this batch's start). Held-out evaluation, sampling and checkpoints
    run inside callbacks, so they count in neither.

    FLOPs and tokens are counted from what the network is actually given: a forward hook on
    `pl_module.net` reads each training forward's latent shape (C, T, H, W) and caption length L, so
    autoencoder compression, buckets of different clip sizes and padded caption lengths all count as
    they are. A forward with gradients counts as a training forward and backward
    (vdm.models.flops.train_flops_per_clip, with the blocks' recomputation when activation checkpointing
    is on); one without gradients inside the step counts once.

    MFU is logged only where the peak is known: on a CUDA GPU of the PEAK_FLOPS table, or wherever
    `peak_flops_per_device` (FLOP/s of one device at the run's precision) is given. A CPU has no
    peak this code could look up that would mean anything (it depends on the core count given to the
    process, the SIMD width, clocks and the matmul library), so MFU is left out there rather than
    logged against a made-up number.

    The step's own figures come from what the training step returned (`outputs["step"]`, a
    vdm.training.module.StepOutputs): its metrics, and the per-clip losses (B,) at their timesteps t (B,) in
    [0, 1] for the per-timestep-bucket losses.
    """

    def __init__(self, metrics_log: MetricsLog, every_n_steps: int, *, peak_flops_per_device: float | None = None):
        if peak_flops_per_device is not None and not peak_flops_per_device > 0:
            raise ValueError(f"peak_flops_per_device must be > 0 (got {peak_flops_per_device!r})")
        self.metrics_log, self.every_n_steps = metrics_log, every_n_steps
        self.peak_flops_per_device = peak_flops_per_device
        self.peak: float | None = None  # FLOP/s of one device for this run; None: MFU is not logged
        self.hook = None
        self.in_step = False  # only forwards inside a training batch are counted
        self.last_logged_step = -1
        self.last_losses: Tensor | None = None  # the per-sample losses already counted (one step's, once)
        self.flops_for: dict[tuple, tuple[int, int]] = {}  # (T, H, W, L, grad, train mode) -> per-clip FLOPs, tokens
        self.batch_start = 0.0
        self.reset()

    def reset(self) -> None:
        self.clips, self.tokens, self.flops = 0, 0, 0
        self.compute_seconds, self.wait_seconds = 0.0, 0.0
        self.bucket_sums: Tensor | None = None  # (NUM_BUCKETS,) summed per-sample loss, on the module's device
        self.bucket_counts: Tensor | None = None  # (NUM_BUCKETS,)

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_logged_step = trainer.global_step  # a resumed run already logged the step it starts from
        self.peak = self.find_peak(trainer, pl_module)
        if self.hook is None:
            self.hook = pl_module.net.register_forward_pre_hook(self.count_forward, with_kwargs=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_start = time.perf_counter()
        if self.metrics_log.callbacks_done_at is not None:
            self.wait_seconds += self.batch_start - self.metrics_log.callbacks_done_at
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.in_step = False
        step = trainer.global_step
        # step 0: no optimizer step has finished (a micro-batch of the first accumulation); the same step
        # twice: the first micro-batch after an optimizer step under gradient accumulation
        log_now = step % self.every_n_steps == 0 and step > self.last_logged_step and step > 0
        if log_now and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the interval ends when its GPU work does
        self.compute_seconds += time.perf_counter() - self.batch_start
        self.clips += len(batch)
        step_outputs = outputs["step"]
        self.add_bucket_losses(step_outputs.timesteps, step_outputs.losses)
        if log_now:
            self.last_logged_step = step
            self.metrics_log.write(trainer, step, self.compute(trainer, pl_module, step_outputs.metrics))
            self.reset()

    def count_forward(self, net, args, kwargs) -> None:
        if not self.in_step:
            return
        x = args[0] if args else kwargs["x"]  # (B, C, T, H, W)
        cond = args[2] if len(args) > 2 else kwargs["cond"]
        with_grad = torch.is_grad_enabled()
        key = (*x.shape[2:], cond.tokens.shape[1], with_grad, net.training)
        if key not in self.flops_for:
            T, H, W, L = key[:4]
            if with_grad:
                recompute = net.grad_checkpointing and net.training  # as SpaceTimeDiT.forward decides
                per_clip = train_flops_per_clip(net, T, H, W, L, recompute=recompute), tokens_per_clip(net, T, H, W)
            else:
                per_clip = forward_flops(net, T, H, W, L), 0
            self.flops_for[key] = per_clip
        flops, tokens = self.flops_for[key]
        self.flops += x.shape[0] * flops
        self.tokens += x.shape[0] * tokens

    def add_bucket_losses(self, t: Tensor, losses: Tensor) -> None:
        """Add one micro-batch's per-clip losses (B,) at their t (B,) to the buckets of t."""
        if losses is self.last_losses:
            return
        self.last_losses = losses
        if self.bucket_sums is None:
            self.bucket_sums = torch.zeros(NUM_BUCKETS, device=losses.device)
            self.bucket_counts = torch.zeros(NUM_BUCKETS, device=losses.device)
        index = (t.detach().float() * NUM_BUCKETS).long().clamp_(0, NUM_BUCKETS - 1)  # (B,); t = 1 joins the last
        self.bucket_sums.index_add_(0, index, losses.detach().float())
        self.bucket_counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float32))

    # ------------------------------------------------------------------ the numbers

    def find_peak(self, trainer, pl_module) -> float | None:
        if self.peak_flops_per_device is not None:
            return self.peak_flops_per_device
        if pl_module.device.type != "cuda":
            log.info("mfu is not logged: no peak FLOP/s is known for a %s device", pl_module.device.type)
            return None
        name = torch.cuda.get_device_name(pl_module.device)
        peak = peak_flops(name, trainer.precision)
        if peak is None:
            log.info("mfu is not logged: no peak FLOP/s known for %s at precision %s", name, trainer.precision)
        else:
            log.info("mfu against %.0f TFLOP/s per device (%s, %s)", peak / 1e12, name, trainer.precision)
        return peak

    def compute(self, trainer, pl_module, step_metrics: dict[str, Tensor]) -> dict[str, float]:
        """This interval's metrics (with the last step's `step_metrics`), reduced over the ranks. Every rank calls
        it (collectives); rank 0 writes."""
        strategy, device = trainer.strategy, pl_module.device
        if (norm := engine_gradient_norm(strategy)) is not None:  # DeepSpeed clips inside its step
            step_metrics = step_metrics | {"grad_norm": norm}
        values = {k: strategy.reduce(v.float(), reduce_op="mean").item() for k, v in step_metrics.items()}

        # one collective for every count: clips, tokens, FLOPs, then each bucket's loss sum and sample count
        buckets = (
            torch.cat([self.bucket_sums, self.bucket_counts])
            if self.bucket_sums is not None
            else torch.zeros(2 * NUM_BUCKETS, device=device)
        )
        dtype = torch.float32 if device.type == "mps" else torch.float64  # FLOPs exceed float32's exact integers
        counts = torch.cat([torch.tensor([self.clips, self.tokens, self.flops], dtype=dtype), buckets.cpu().to(dtype)])
        # the ranks of a sequence-parallel group share their clips, each doing 1 / sp of their work: count them once
        sharing = getattr(pl_module, "sequence_parallel_size", 1)
        counts = strategy.reduce(counts.to(device), reduce_op="sum").cpu() / sharing
        clips, tokens, flops = counts[:3].tolist()
        sums, samples = counts[3 : 3 + NUM_BUCKETS].tolist(), counts[3 + NUM_BUCKETS :].tolist()

        # rank 0's wall clock: the ranks step together, held in lock-step by the gradient all-reduce
        elapsed = self.compute_seconds + self.wait_seconds
        values["clips_per_sec"] = clips / elapsed
        values["data_wait"] = self.wait_seconds / elapsed
        if tokens > 0:
            values["tokens_per_sec"] = tokens / elapsed
        if self.peak is not None and flops > 0:
            values["mfu"] = flops / elapsed / (trainer.world_size * self.peak)
        if device.type == "cuda":
            peak_bytes = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
            values["peak_gpu_mem_gb"] = strategy.reduce(peak_bytes, reduce_op="max").item() / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        for bucket, (total, count) in enumerate(zip(sums, samples)):
            if count > 0:
                values[f"train/loss_t{bucket}"] = total / count
        return values
