"""Prompts to videos, from a run directory or an exported weights file.

    python scripts/sample.py --run runs/<name> | --weights model.safetensors [--config runs/<name>/config.yaml]
                             --prompt "..." [--prompt "..." ...] | --prompts-file prompts.txt
                             --out DIR [--seed 0] [--steps 25] [--guidance-scale 5] [--size 32] [--frames 8]
                             [--fps 4] [--sampler NAME] [--shift S]
                             [--guidance-interval LOW HIGH] [--ema] [--batch-size N]
                             [--columns 4] [--upscale 1] [--device cpu|cuda] [--precision fp32|bf16]

Writes DIR/<index>.mp4 and DIR/<index>.gif for each prompt (index 000, 001, ... in prompt order), the
same clips tiled in DIR/grid.mp4 and DIR/grid.gif, and DIR/prompts.txt (one prompt a line, in index order).

Where the parts come from:
  * --run: the network from the run's newest complete checkpoint (runs/<name>/checkpoints/step-N.ckpt,
    any layout train.py writes: Lightning file, DeepSpeed or FSDP2 directory), read by vdm/checkpoints.py
    (torch.load with weights_only=True; only a checkpoint that refuses it, which vdm does not write, is
    unpickled in full, with a note), its model config from runs/<name>/config.yaml; the text
    encoder, autoencoder and objective are built from the same config.yaml with Hydra, as train.py builds them.
  * --weights: the network from the .safetensors file (its metadata holds the model config; nothing is
    unpickled). The text encoder, autoencoder and objective come from --config (a run's config.yaml),
    or without it from the project's defaults (conf/config.yaml as `python train.py` composes it with
    no overrides: the clip-tiny text encoder from its fixed seed, the identity autoencoder, rectified
    flow). A text encoder or autoencoder whose width does not fit the network is refused.
The config also supplies every option not given here: the sampling section (steps, guidance scale, seed,
fps, sampler, shift) and the data section (--size, --frames); options given on the command line win.

The same options and seed give the same videos, byte for byte, on the same machine. The prompts are
generated in batches of --batch-size (default: all at once); batch k draws its noise from seed + k.
--ema samples the EMA weights (a checkpoint's EMA, or a weights file's ema.* tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from vdm.checkpoints import CheckpointError, load_network
from vdm.command_line import build, compose_config
from vdm.data.video import encode_gif, encode_mp4
from vdm.generate import SamplingSettings, generate, grid, to_uint8_frames
from vdm.models import SpaceTimeDiT
from vdm.models.weights import build_from_weights, has_ema
from vdm.training.run_dir import RunDir

SECTIONS = ("text", "autoencoder", "diffusion", "sampling", "data")  # what sampling reads of a run config


class SampleError(Exception):
    """Options, files or parts that cannot make videos; the message says why."""


@dataclass
class Parts:
    net: SpaceTimeDiT
    text_encoder: object
    autoencoder: object
    objective: object
    config: dict  # the run config (or the defaults) the other parts and the option defaults come from
    source: str  # where the network's weights were read, for the summary


# ------------------------------------------------------------------ the parts


def default_config() -> dict:
    """The sections of conf/config.yaml as `python train.py` composes it with no overrides."""
    config = compose_config()
    return {section: config[section] for section in SECTIONS}


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise SampleError(f"no run config at {path}")
    config = yaml.safe_load(path.read_text())  # train.py writes it resolved, as plain values
    missing = [section for section in ("text", "autoencoder", "diffusion") if section not in (config or {})]
    if missing:
        raise SampleError(f"{path}: not a run config (no {', '.join(missing)} section)")
    return config


def net_from_run(run: Path, config: dict, ema: bool) -> tuple[SpaceTimeDiT, str]:
    """The network of a run's newest complete checkpoint, checked against the run's model config."""
    checkpoints = RunDir(run).complete_checkpoints()
    if not checkpoints:
        raise SampleError(f"{run}: no complete checkpoint in {RunDir(run).checkpoints}")
    step, path = checkpoints[-1]
    net = load_network(path, config.get("model"), run / "config.yaml", ema=ema)
    return net, f"{path} (step {step}{', EMA weights' if ema else ''})"


def load_parts(run: Path | None, weights: Path | None, config_path: Path | None, ema: bool) -> Parts:
    if (run is None) == (weights is None):
        raise SampleError("give one of --run or --weights")
    if run is not None:
        if config_path is not None:
            raise SampleError("--config goes with --weights; a run directory has its own config.yaml")
        config = read_config(run / "config.yaml")
        net, source = net_from_run(run, config, ema)
    else:
        config = read_config(config_path) if config_path is not None else default_config()
        if ema and not has_ema(weights):
            raise SampleError(f"{weights}: --ema, but the file holds no EMA weights (ema.* tensors)")
        net, source = build_from_weights(weights, ema=ema), f"{weights}{' (EMA weights)' if ema else ''}"
    text_encoder, autoencoder = build(config, "text"), build(config, "autoencoder")
    if text_encoder.dim != net.text_dim:
        raise SampleError(
            f"the text encoder is {text_encoder.dim} wide, the network reads text_dim={net.text_dim}: "
            "pass the config of the run that trained these weights with --config"
        )
    if autoencoder.latent_channels != net.in_channels:
        raise SampleError(
            f"the autoencoder gives {autoencoder.latent_channels} latent channels, the network reads "
            f"in_channels={net.in_channels}: pass the config of the run that trained these weights with --config"
        )
    return Parts(net, text_encoder, autoencoder, build(config, "diffusion"), config, source)


# ------------------------------------------------------------------ prompts and settings


def read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The prompts in order: each --prompt, then each non-empty line of --prompts-file."""
    found = list(prompts or [])
    if prompts_file is not None:
        found += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not found:
        raise SampleError("no prompts: give --prompt (repeatable) or --prompts-file")
    return found


def settings_for(config: dict, prompts: list[str], given: dict) -> SamplingSettings:
    """The run config's sampling section (when it has one) with the options given on the command line."""
    overrides = {"prompts": prompts, **{k: v for k, v in given.items() if v is not None}}
    if "sampling" in config:
        return build(config, "sampling", **overrides)
    try:
        return SamplingSettings(**overrides)
    except (TypeError, ValueError) as error:
        raise SampleError(f"sampling: {error}") from error


# ------------------------------------------------------------------ generating and writing


def sample(parts: Parts, settings: SamplingSettings, *, frames: int, size: int, batch_size: int, device, precision):
    """(N, C, T, H, W) in [-1, 1]: the prompts in batches, batch k from seed + k."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    videos = []
    for k, start in enumerate(range(0, len(settings.prompts), batch_size)):
        prompts = settings.prompts[start : start + batch_size]
        batch_settings = replace(settings, prompts=prompts, seed=settings.seed + k)
        with autocast:
            videos.append(
                generate(
                    parts.net,
                    parts.text_encoder,
                    parts.autoencoder,
                    parts.objective,
                    prompts,
                    num_frames=frames,
                    size=size,
                    settings=batch_settings,
                )
            )
    return torch.cat(videos)


def write_videos(video: torch.Tensor, prompts: list[str], out: Path, fps: float, columns: int | None, upscale: int):
    frames = to_uint8_frames(video)  # (N, T, H, W, 3)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=2).repeat(upscale, axis=3)
    rate = max(1, round(fps))  # the encoders take whole frames per second
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, clip in enumerate(frames):
        for suffix, encode in ((".mp4", encode_mp4), (".gif", encode_gif)):
            path = out / f"{index:03d}{suffix}"
            path.write_bytes(encode(clip, rate))
            written.append(path)
    tiled = grid(frames, columns or min(4, len(frames)))
    (out / "grid.mp4").write_bytes(encode_mp4(tiled, rate))
    (out / "grid.gif").write_bytes(encode_gif(tiled, rate))
    (out / "prompts.txt").write_text("".join(f"{prompt}\n" for prompt in prompts))
    return [*written, out / "grid.mp4", out / "grid.gif", out / "prompts.txt"]


def run(args: argparse.Namespace) -> list[Path]:
    prompts = read_prompts(args.prompt, args.prompts_file)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = load_parts(args.run, args.weights, args.config, args.ema)
    given = {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": args.guidance_interval,
        "seed": args.seed,
        "fps": args.fps,
        "sampler": args.sampler,
        "shift": args.shift,
    }
    settings = settings_for(parts.config, prompts, given)
    data = parts.config.get("data") or {}
    frames = args.frames if args.frames is not None else int(data.get("num_frames") or 8)
    size = args.size if args.size is not None else int(data.get("size") or 32)
    for name, value in (("--batch-size", args.batch_size), ("--columns", args.columns), ("--upscale", args.upscale)):
        if value is not None and value < 1:
            raise SampleError(f"{name} must be >= 1 (got {value})")

    parts.net.to(device)
    parts.text_encoder.to(device)
    parts.autoencoder.to(device)
    try:
        video = sample(
            parts,
            settings,
            frames=frames,
            size=size,
            batch_size=args.batch_size or len(prompts),
            device=device,
            precision=args.precision,
        )
    except ValueError as error:  # a size or length the network cannot take, a sampler the objective lacks
        raise SampleError(f"{frames} frames of {size}x{size}: {error}") from error
    written = write_videos(video, prompts, args.out, settings.fps, args.columns, args.upscale)
    print(f"sampled {len(prompts)} prompt(s), {frames} frames of {size}x{size}, from {parts.source}")
    print(f"  seed {settings.seed}, {settings.steps} steps, guidance scale {settings.guidance_scale}")
    print(f"  wrote {len(written)} files to {args.out}")
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a run directory (runs/<name>): its newest complete checkpoint")
    source.add_argument("--weights", type=Path, help="a .safetensors weights file (scripts/export.py)")
    p.add_argument("--config", type=Path, help="with --weights: the run config.yaml the other parts are built from")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    p.add_argument("--prompts-file", type=Path, help="a text file of prompts, one a line")
    p.add_argument("--out", type=Path, required=True, help="the folder to write the videos to")
    p.add_argument("--seed", type=int, help="noise seed (default: the config's sampling.seed, else 0)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the config's, else 25)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance; 1 turns it off (default: 5)")
    p.add_argument("--sampler", help="a sampler of the objective (default: the objective's own)")
    p.add_argument(
        "--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), help="guide only for t in [LOW, HIGH]"
    )
    p.add_argument("--shift", type=float, help="timestep shift (default: the config's or the objective's)")
    p.add_argument("--size", type=int, help="height and width in pixels (default: the config's data.size, else 32)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the config's data.num_frames, else 8)")
    p.add_argument("--fps", type=float, help="frame rate of the files written (default: the config's, else 4)")
    p.add_argument("--ema", action="store_true", help="sample the EMA weights")
    p.add_argument("--batch-size", type=int, help="prompts generated together (default: all)")
    p.add_argument("--columns", type=int, help="clips per row of the grid (default: up to 4)")
    p.add_argument("--upscale", type=int, default=1, help="repeat each pixel this many times in the files")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast the network")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (SampleError, CheckpointError, ValueError, OSError) as error:
        print(f"sample: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
