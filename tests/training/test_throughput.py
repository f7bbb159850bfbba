"""TrainMetrics: per-interval throughput, FLOPs, timestep-bucket losses and their reduction over ranks,
measured on real (tiny) Lightning training runs on the CPU."""

from __future__ import annotations

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

# isort: split
import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from vdm.models import SpaceTimeDiT
from vdm.models.flops import tokens_per_clip, train_flops_per_clip
from vdm.training.metrics_log import MetricsLog
from vdm.training.module import StepOutputs
from vdm.training.throughput import TrainMetrics, matmul_format, peak_flops
from vdm.types import TextCond

CLIP = (3, 4, 16, 16)  # (C, T, H, W) of the pixel clips in a batch
LATENT = (4, 8, 8)  # (T, H, W) after the stand-in autoencoder halves the height and width
TEXT_TOKENS, TEXT_DIM = 5, 16
TIMESTEPS = torch.tensor([0.1, 0.3, 0.3, 1.0])  # buckets 0, 1, 1, 3: none in [.5, .75)
LOSS_SCALE = torch.tensor([1.0, 2.0, 4.0, 8.0])  # step k's per-sample losses are LOSS_SCALE * (k + 1)


class TinyDiffusion(L.LightningModule):
    """What TrainMetrics reads of VideoDiffusion: `net`, and what each training step returns, a StepOutputs with
    the step's metrics and per-sample timesteps and losses (fixed here, so the bucket means are known)."""

    def __init__(self, grad_checkpointing: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = SpaceTimeDiT(
            in_channels=3, text_dim=TEXT_DIM, width=32, depth=2, heads=2, grad_checkpointing=grad_checkpointing
        )
        self.micro_batches = 0

    def training_step(self, batch, batch_idx):
        x0 = F.avg_pool3d(batch, (1, 2, 2))  # a stand-in autoencoder: latents are half the clip's size
        B = len(batch)
        g = torch.Generator().manual_seed(batch_idx)
        cond = TextCond(
            torch.randn(B, TEXT_TOKENS, TEXT_DIM, generator=g),
            torch.ones(B, TEXT_TOKENS, dtype=torch.bool),
            torch.randn(B, TEXT_DIM, generator=g),
        )
        loss = (self.net(x0, TIMESTEPS, cond) - x0).square().mean()
        self.micro_batches += 1
        metrics = {"train/loss": loss.detach(), "lr": torch.tensor(0.1)}
        losses = LOSS_SCALE * self.micro_batches
        step = StepOutputs(losses, TIMESTEPS, [], torch.tensor(True), metrics)
        return {"loss": loss, "step": step}

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.0)


class Recording(MetricsLog):
    def __init__(self, path):
        super().__init__(path)
        self.rows: list[tuple[int, dict]] = []

    def write(self, trainer, step, metrics):
        self.rows.append((step, dict(metrics)))
        super().write(trainer, step, metrics)


class HeldOutForward(L.Callback):
    """A forward outside the training step, as the held-out loss and sampling callbacks make: not counted."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cond = TextCond(torch.zeros(1, 3, TEXT_DIM), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, TEXT_DIM))
        with torch.no_grad():
            pl_module.net(torch.zeros(1, 3, 4, 8, 8), torch.zeros(1), cond)


def fit(tmp_path, module, steps, every, accumulate=1, **metrics_kwargs) -> Recording:
    metrics_log = Recording(tmp_path / "metrics.csv")
    clips = torch.randn(4 * steps * accumulate, *CLIP)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[TrainMetrics(metrics_log, every, **metrics_kwargs), HeldOutForward(), metrics_log],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(clips, batch_size=4))
    return metrics_log


def test_throughput_and_flops_are_those_of_the_latents_the_network_trained_on(tmp_path):
    module = TinyDiffusion()
    peak = 1e9
    log = fit(tmp_path, module, steps=4, every=2, peak_flops_per_device=peak)
    assert [step for step, _ in log.rows] == [2, 4]
    per_clip = train_flops_per_clip(module.net, *LATENT, TEXT_TOKENS)
    for _, row in log.rows:
        # clips/s, tokens/s and FLOP/s share one interval: their ratios are exact per-clip counts
        assert row["tokens_per_sec"] / row["clips_per_sec"] == pytest.approx(tokens_per_clip(module.net, *LATENT))
        assert row["mfu"] * peak / row["clips_per_sec"] == pytest.approx(per_clip)
        assert 0 <= row["data_wait"] < 1 and row["lr"] == pytest.approx(0.1)
        assert "peak_gpu_mem_gb" not in row  # CPU
    with open(tmp_path / "metrics.csv", newline="") as file:
        written = list(csv.DictReader(file))
    assert [r["step"] for r in written] == ["2", "4"] and float(written[0]["tokens_per_sec"]) > 0


def test_timestep_buckets_average_the_interval_and_leave_empty_buckets_out(tmp_path):
    log = fit(tmp_path, TinyDiffusion(), steps=4, every=2)
    (_, first), (_, second) = log.rows
    for row, scale in ((first, (1 + 2) / 2), (second, (3 + 4) / 2)):  # mean of LOSS_SCALE's factor over the steps
        assert row["train/loss_t0"] == pytest.approx(1.0 * scale)
        assert row["train/loss_t1"] == pytest.approx((2.0 + 4.0) / 2 * scale)
        assert row["train/loss_t3"] == pytest.approx(8.0 * scale)  # t = 1 belongs to the last bucket
        assert "train/loss_t2" not in row
        assert "mfu" not in row  # a CPU and no peak given: no MFU
    with open(tmp_path / "metrics.csv", newline="") as file:
        assert next(csv.DictReader(file))["train/loss_t2"] == ""


def test_accumulation_logs_each_step_once_and_counts_every_micro_batch(tmp_path):
    module = TinyDiffusion(grad_checkpointing=True)
    log = fit(tmp_path, module, steps=4, every=2, accumulate=2, peak_flops_per_device=1e9)
    assert [step for step, _ in log.rows] == [2, 4]
    per_clip = train_flops_per_clip(module.net, *LATENT, TEXT_TOKENS, recompute=True)
    assert per_clip > train_flops_per_clip(module.net, *LATENT, TEXT_TOKENS, recompute=False)
    for _, row in log.rows:
        assert row["mfu"] * 1e9 / row["clips_per_sec"] == pytest.approx(per_clip)
    # 4 micro-batches per row; micro-batch m (1-based) has losses LOSS_SCALE * m
    assert log.rows[0][1]["train/loss_t3"] == pytest.approx(8.0 * (1 + 2 + 3 + 4) / 4)
    assert log.rows[1][1]["train/loss_t3"] == pytest.approx(8.0 * (5 + 6 + 7 + 8) / 4)


class TwoIdenticalRanks:
    """A strategy whose all-reduce sees a second rank with exactly this rank's numbers."""

    def reduce(self, tensor, reduce_op="mean"):
        return tensor * 2 if reduce_op == "sum" else tensor


def test_counts_are_summed_over_ranks_and_mfu_is_per_device(tmp_path):
    callback = TrainMetrics(MetricsLog(tmp_path / "m.csv"), 1)
    callback.peak = 1e12
    module = SimpleNamespace(device=torch.device("cpu"))
    metrics = {"train/loss": torch.tensor(0.5)}

    def interval():
        callback.reset()
        callback.clips, callback.tokens, callback.flops = 8, 800, 8e12
        callback.compute_seconds, callback.wait_seconds = 3.0, 1.0
        callback.last_losses = None
        callback.add_bucket_losses(torch.tensor([0.1, 0.6]), torch.tensor([1.0, 3.0]))

    interval()
    one = callback.compute(SimpleNamespace(strategy=TwoIdenticalRanks(), world_size=1), module, metrics)
    interval()
    one = callback.compute(
        SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t), world_size=1), module, metrics
    )
    interval()
    two = callback.compute(SimpleNamespace(strategy=TwoIdenticalRanks(), world_size=2), module, metrics)
    assert one == {
        "train/loss": 0.5,
        "clips_per_sec": 2.0,
        "data_wait": 0.25,
        "tokens_per_sec": 200.0,
        "mfu": 2.0,
        "train/loss_t0": 1.0,
        "train/loss_t2": 3.0,
    }
    # twice the clips, tokens and FLOPs in the same time on twice the devices: the same utilization, the
    # same means
    assert two == {**one, "clips_per_sec": 4.0, "tokens_per_sec": 400.0}


def test_peak_flops_table():
    assert matmul_format("bf16-mixed") == matmul_format("16-mixed") == "bf16"
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("NVIDIA H200", "bf16-true") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe", "32-true") == 19.5e12  # fp32 matmuls without TF32
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
        assert peak_flops("NVIDIA A100-SXM4-40GB", "32-true") == 156e12
    finally:
        torch.set_float32_matmul_precision(previous)
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16-mixed") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "64-true") is None


def test_the_peak_is_looked_up_for_the_runs_gpu_and_precision(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    callback = TrainMetrics(MetricsLog(tmp_path / "m.csv"), 1)
    assert callback.find_peak(SimpleNamespace(precision="bf16-mixed"), on_gpu) == 756e12
    assert callback.find_peak(SimpleNamespace(precision="64-true"), on_gpu) is None
    assert (
        callback.find_peak(SimpleNamespace(precision="bf16-mixed"), SimpleNamespace(device=torch.device("cpu"))) is None
    )
    given = TrainMetrics(MetricsLog(tmp_path / "m.csv"), 1, peak_flops_per_device=5e12)
    assert given.find_peak(SimpleNamespace(precision="32-true"), on_gpu) == 5e12
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        TrainMetrics(MetricsLog(None), 1, peak_flops_per_device=0)
