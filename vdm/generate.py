"""Prompts -> videos: text encoder, guided sampler and autoencoder put together (pure PyTorch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from vdm.diffusion import SAMPLERS, classifier_free_guidance
from vdm.seeding import derive_seed


@torch.no_grad()
def generate(
    net: nn.Module,
    text_encoder,
    autoencoder,
    objective,
    prompts: list[str],
    *,
    num_frames: int,
    size: int | tuple[int, int],
    settings: SamplingSettings,
    first_index: int = 0,
) -> Tensor:
    """One clip per prompt -> (N, C, T, H, W) float in [-1, 1], size x size or (height, width). The same seed
    gives the same videos.

    `objective` (vdm.diffusion) decides what the network's output means and how to sample it. The starting noise
    of prompt i (numbered from `first_index`) is drawn from a generator of its own, seeded with (settings.seed,
    first_index + i) on the CPU: a prompt's clip does not depend on which prompts share its batch, on the batch
    size or on the device, so prompts can be split over processes and give the same clips. An ancestral
    sampler's fresh noise at each step (DDPM's "ddpm") comes from one generator for the batch.
    """
    device = next(net.parameters()).device
    height, width = (size, size) if isinstance(size, int) else size
    latent_shape = (autoencoder.latent_channels, *autoencoder.latent_shape(num_frames, height, width))
    noise = torch.stack(
        [
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(derive_seed(settings.seed, index)))
            for index in range(first_index, first_index + len(prompts))
        ]
    ).to(device)  # (N, C, T, H, W) latents at t = 1
    generator = torch.Generator(device=device).manual_seed(derive_seed(settings.seed, first_index, len(prompts)))
    cond = text_encoder.encode(prompts)
    uncond = text_encoder.encode([""] * len(prompts))
    model_fn = classifier_free_guidance(net, cond, uncond, settings.guidance_scale, settings.guidance_interval)
    latents = objective.sample(
        model_fn, noise, steps=settings.steps, sampler=settings.sampler, generator=generator, shift=settings.shift
    )
    return autoencoder.decode(latents).clamp(-1, 1)


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """(N, C, T, H, W) in [-1, 1] -> (N, T, H, W, 3) uint8 (grey clips are repeated to RGB)."""
    video = ((video.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1, -1)
    return rearrange(video, "n c t h w -> n t h w c").numpy()


def grid(frames: np.ndarray, columns: int, upscale: int = 1, pad: int = 2) -> np.ndarray:
    """(N, T, H, W, 3) -> (T, rows*(H+pad)-pad, columns*(W+pad)-pad, 3): clips tiled row by row."""
    n, t, h, w, c = frames.shape
    if upscale > 1:
        frames = frames.repeat(upscale, axis=2).repeat(upscale, axis=3)
        h, w = h * upscale, w * upscale
    rows = -(-n // columns)
    canvas = np.full((t, rows * (h + pad) - pad, columns * (w + pad) - pad, c), 255, dtype=np.uint8)
    for index in range(n):
        top, left = (index // columns) * (h + pad), (index % columns) * (w + pad)
        canvas[:, top : top + h, left : left + w] = frames[index]
    return canvas


@dataclass
class SamplingSettings:
    """Which videos a run generates to show its progress, and how they are sampled."""

    prompts: list[str] = field(default_factory=list)
    steps: int = 25  # sampler steps (Heun evaluates the network 2 steps - 1 times)
    sampler: str | None = None  # euler or heun (flow), ddim or ddpm (DDPM); None: the objective's default
    guidance_scale: float = 5.0  # classifier-free guidance; 1.0 turns it off
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [low, high]
    # (Kynkäänniemi et al. 2024); t = 1 is noise, so [0.0, 0.7] skips guidance at the highest noise levels
    shift: float | None = None  # time shift of the sampling grid; None: the objective's own rule
    seed: int = 0
    fps: float = 4.0
    weights: str = "ema"  # ema (the raw weights while a run has no EMA), raw, or both: EMA and raw side by side

    def __post_init__(self):
        if not isinstance(self.prompts, list) or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"prompts must be a list of strings (got {self.prompts!r})")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1 (got {self.steps!r})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be null or one of {', '.join(SAMPLERS)} (got {self.sampler!r})")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (got {self.guidance_scale!r})")
        interval = list(self.guidance_interval)
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"guidance_interval must be [low, high] with 0 <= low <= high <= 1 (got {interval!r})")
        self.guidance_interval = [float(v) for v in interval]
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be null or > 0 (got {self.shift!r})")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int (got {self.seed!r})")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0 (got {self.fps!r})")
        if self.weights not in ("ema", "raw", "both"):
            raise ValueError(f"weights must be ema, raw or both (got {self.weights!r})")
