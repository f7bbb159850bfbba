"""Training speed of vdm against a plain PyTorch loop over the same model, batches and optimizer.

    python scripts/bench_train.py [--warmup 3 --steps 10 --repeats 3] [--json out.json] [key=value ...]

The key=value arguments are train.py's (the same Hydra config, composed the same way): the preset
(`model=dit_xl`), clip length and size (`data.num_frames=16 data.size=32`), micro batch (`data.batch_size=8`),
precision (`trainer.precision=bf16-mixed`) and the speed options (`model.compile_blocks=true`,
`model.grad_checkpointing=true`, `model.grad_checkpointing_every=2`, `model.grad_checkpointing_scope=attention`,
`model.attention_backend=flash`, `optim.fused=true`). It prints step time, clips/s, tokens/s, MFU (against the
device's dense peak where vdm/training/throughput.py knows it, and against a large matmul measured in the same
run), peak memory, and the framework's overhead as vdm steps/s / plain steps/s (vdm.training.bench).

`--find-max-batch` instead searches the largest micro batch that trains (plain loop, GPU only).
One process: the benchmark measures a single device (trainer.devices=1, strategy=ddp).
"""

from __future__ import annotations

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

# isort: split
import argparse
import dataclasses
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from vdm.command_line import build, build_network, compose_config
from vdm.config_check import ConfigError, check_config
from vdm.training.bench import Parts, Timing, compare, make_batches, plain_run
from vdm.training.bench import batch_loader as make_loader

RGB = 3  # the clips are RGB pixels; the autoencoder maps them to its latents
SECTIONS = ("text", "autoencoder", "model", "diffusion", "data", "optim", "trainer", "ema", "strategy")


def build_parts(config: dict) -> tuple[Parts, dict]:
    """Every part the training step uses, built from the config as train.py builds it."""
    check_config({k: config[k] for k in SECTIONS}, supplied={"model": {"in_channels", "text_dim"}})
    strategy = build(config, "strategy")
    if strategy.name != "DDP":  # its plain loop is one process's step; DDP on one process is that step
        raise ConfigError(f"strategy: the benchmark runs one process (strategy=ddp), got {strategy.name}")
    text_encoder, autoencoder, net = build_network(config)
    settings = build(config, "trainer")
    if settings.world_size() != 1:
        raise ConfigError(f"trainer.devices: the benchmark runs one process, got {settings.world_size()}")
    data = build(config, "data")
    bucket = data.bucket_list[0]
    parts = Parts(
        net,
        build(config, "diffusion"),
        text_encoder,
        autoencoder,
        build(config, "optim"),
        settings,
        ema=build(config, "ema"),
        seed=config["seed"],
    )
    clip = {"batch_size": bucket.batch_size, "frames": bucket.frames, "height": bucket.height, "width": bucket.width}
    return parts, clip


def device_of(settings) -> torch.device:
    wants_gpu = settings.accelerator in ("gpu", "cuda") or settings.accelerator == "auto"
    return torch.device("cuda", 0) if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def report(result, command: str) -> str:
    def loop(name, f):
        mfu = f"{100 * f.mfu:.1f}%" if f.mfu is not None else "n/a"
        memory = f"{f.peak_memory_gb:.2f} GiB" if f.peak_memory_gb is not None else "n/a (CPU)"
        return (
            f"{name:6s} {1000 * f.step_seconds:9.1f} ms/step  {f.steps_per_sec:7.3f} steps/s  "
            f"{f.clips_per_sec:8.2f} clips/s  {f.tokens_per_sec:10.0f} tokens/s  "
            f"{f.flops_per_sec / 1e12:8.3f} TFLOP/s  "
            f"MFU {mfu} (peak), {100 * f.mfu_vs_matmul:.1f}% (matmul)  peak memory {memory}  "
            f"repeats {[round(1000 * s, 1) for s in f.repeat_step_seconds]} ms"
        )

    C, T, H, W = result.clip
    peak = f"{result.peak_flops / 1e12:.0f} TFLOP/s" if result.peak_flops else "unknown"
    return "\n".join(
        [
            f"command: {command}",
            f"device: {result.device}; torch {torch.__version__}; {platform.processor() or platform.machine()}",
            f"precision {result.precision}; micro batch {result.batch_size} clips of {C}x{T}x{H}x{W} (CxTxHxW), "
            f"{result.tokens_per_clip} tokens per clip, {result.flops_per_step / 1e9:.2f} GFLOP per step",
            f"dense peak {peak}; measured matmul {result.matmul_flops / 1e12:.3f} TFLOP/s",
            loop("plain", result.plain),
            loop("vdm", result.vdm),
            f"overhead ratio (vdm steps/s / plain steps/s): {result.overhead_ratio:.3f}",
            f"losses equal in both loops: {result.losses_equal} (max difference {result.max_loss_difference:.3g})",
        ]
    )


def find_max_batch(parts: Parts, clip: dict, device: torch.device, limit: int) -> int:
    """The largest micro batch the plain loop trains two steps with, by doubling then bisection (CUDA OOM)."""
    if device.type != "cuda":
        raise ConfigError("--find-max-batch: only on a GPU (a CPU run swaps rather than failing)")
    timing = Timing(warmup_steps=1, steps=1, repeats=1)

    def fits(batch: int) -> bool:
        try:
            shape = (RGB, clip["frames"], clip["height"], clip["width"])
            loader = make_loader(make_batches(2, batch, *shape))
            plain_run(parts, loader, device, timing)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            parts.net.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    good, bad = 0, None
    batch = 1
    while batch <= limit and fits(batch):
        good, batch = batch, batch * 2
    bad = min(batch, limit + 1)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating; medians reported")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--find-max-batch", type=int, metavar="LIMIT", help="largest micro batch up to LIMIT")
    args, overrides = parser.parse_known_args(argv)
    command = shlex.join(["python", "scripts/bench_train.py", *argv])
    try:
        timing = Timing(args.warmup, args.steps, args.repeats)
        config = compose_config(overrides)
        parts, clip = build_parts(config)
        device = device_of(parts.settings)
        if args.find_max_batch:
            largest = find_max_batch(parts, clip, device, args.find_max_batch)
            print(f"command: {command}\ndevice: {torch.cuda.get_device_name(device)}\nlargest micro batch: {largest}")
            return 0
        shape = (RGB, clip["frames"], clip["height"], clip["width"])
        batches = make_batches(timing.warmup_steps + timing.steps, clip["batch_size"], *shape, seed=config["seed"])
        with tempfile.TemporaryDirectory() as work:
            result = compare(parts, batches, device, timing, Path(work) / "run")
    except (ConfigError, ValueError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    print(report(result, command))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(result) | {"command": command}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
