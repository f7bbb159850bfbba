"""Prompts -> videos: text encoder, guided sampler and autoencoder put together (pure PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from vdm.diffusion import classifier_free_guidance, sample_euler


@torch.no_grad()
def generate(
    net: nn.Module,
    text_encoder,
    autoencoder,
    prompts: list[str],
    *,
    num_frames: int,
    size: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    shift: float = 1.0,
) -> Tensor:
    """One clip per prompt -> (N, C, T, H, W) float in [-1, 1]. The same seed gives the same videos."""
    device = next(net.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    latent_size = size // autoencoder.spatial_factor
    latent_frames = num_frames // autoencoder.temporal_factor
    noise = torch.randn(
        len(prompts),
        autoencoder.latent_channels,
        latent_frames,
        latent_size,
        latent_size,
        generator=generator,
        device=device,
    )
    cond = text_encoder.encode(prompts)
    uncond = text_encoder.encode([""] * len(prompts))
    velocity_fn = classifier_free_guidance(net, cond, uncond, guidance_scale)
    latents = sample_euler(velocity_fn, noise, steps, shift=shift, generator=generator)
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
    """Which videos a run generates to show its progress."""

    prompts: list[str] = field(default_factory=list)
    steps: int = 25  # Euler steps
    guidance_scale: float = 5.0  # classifier-free guidance; 1.0 turns it off
    shift: float = 1.0  # > 1 spends more steps at high noise
    seed: int = 0
    fps: float = 4.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (got {self.steps})")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0 (got {self.fps})")
