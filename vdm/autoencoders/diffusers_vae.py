"""Latent spaces from diffusers' VAEs: an image VAE applied frame by frame, and a video VAE that also compresses time.

Shape legend (see vdm/types.py): B batch, C pixel channels, c latent channels, T frames, H height, W width;
t, h, w the latent frames, height and width.

Both are frozen, kept in eval mode, and give normalized latents, the way the diffusers pipelines that use them
scale theirs, so a model imported from such a pipeline reads the latents it was trained on:
    KL (AutoencoderKL; SD, SDXL and PixArt's 4 channels, scaling 0.18215; FLUX's 16, scale and shift):
        z = (mean - shift_factor) * scaling_factor,  x = decode(z / scaling_factor + shift_factor)
    Wan (AutoencoderKLWan, Wan 2.1: 8x8 spatial, 4x temporal, 16 channels, causal: 1 + 4k frames):
        z = (mean - latents_mean) / latents_std per channel,  x = decode(z * latents_std + latents_mean)
`mean` is the encoder's `latent_dist.mean`: latents are a deterministic function of the clip, so a clip encodes
the same in every run and every cache.

Weights come from `path`, a local folder as diffusers writes it (config.json and
diffusion_pytorch_model.safetensors; a pipeline's `vae/`), never a hub and never a pickle; without `path`,
`config` (the class's constructor arguments) builds one with random weights from `seed`, for tests and CPU runs.
Decoding a long or large clip within memory: `slicing` decodes one clip (KL: one frame) at a time and `tiling`
decodes in overlapping spatial tiles (diffusers' `enable_slicing` / `enable_tiling`).
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from einops import rearrange
from torch import Tensor, nn

from vdm.local_weights import check_source


def _build(cls, path: str | Path | None, config: dict | None, seed: int, dtype: str) -> nn.Module:
    torch_dtype = check_source(path, config, "diffusers VAE", dtype)
    if path is not None:
        return cls.from_pretrained(path, local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is neither used nor changed
        torch.manual_seed(seed)
        vae = cls(**config)
        return vae if torch_dtype == torch.float32 else vae.to(torch_dtype)  # built in float32


class _FrozenVAE(nn.Module):
    spatial_factor: int
    temporal_factor: int
    diffusers_class: str  # the diffusers model class it wraps

    def __init__(
        self,
        path: str | Path | None = None,
        config: dict | None = None,
        seed: int = 0,
        dtype: str = "float32",
        slicing: bool = True,
        tiling: bool = False,
    ):
        super().__init__()
        vae = _build(getattr(diffusers, self.diffusers_class), path, config, seed, dtype)
        self.vae = vae.eval().requires_grad_(False)
        if slicing:
            self.vae.enable_slicing()
        if tiling:
            self.vae.enable_tiling()
        self.configure()

    def configure(self) -> None:
        """The factors and normalization of the VAE just built (each class reads its own config)."""
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels if hasattr(self.vae.config, "latent_channels") else self.vae.config.z_dim

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def train(self, mode: bool = True) -> _FrozenVAE:
        return super().train(False)  # frozen: eval mode whatever the parent does

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of a clip of (frames, height, width); ValueError naming what does not divide."""
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(
                f"height and width must be multiples of the VAE's spatial factor {f} (got {height}x{width})"
            )
        return self.latent_frames(frames), height // f, width // f

    def latent_frames(self, frames: int) -> int:
        return frames


class KLAutoencoder(_FrozenVAE):
    """diffusers' AutoencoderKL on every frame: (B, C, T, H, W) -> (B, c, T, H/f, W/f), f = 2^(levels - 1)."""

    temporal_factor = 1
    diffusers_class = "AutoencoderKL"

    def configure(self) -> None:
        self.spatial_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(self.vae.config.shift_factor or 0.0)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        # video (B, C, T, H, W) in [-1, 1] -> latents (B, c, T, h, w), normalized
        B = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c h w").to(self.dtype)
        mean = self.vae.encode(frames).latent_dist.mean
        return rearrange((mean.float() - self.shift) * self.scale, "(b t) c h w -> b c t h w", b=B)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        # latents (B, c, T, h, w) -> video (B, C, T, H, W), about [-1, 1]
        B = latents.shape[0]
        frames = rearrange(latents.float() / self.scale + self.shift, "b c t h w -> (b t) c h w").to(self.dtype)
        return rearrange(self.vae.decode(frames).sample.float(), "(b t) c h w -> b c t h w", b=B)


class WanAutoencoder(_FrozenVAE):
    """diffusers' AutoencoderKLWan: (B, C, 1 + r k, H, W) -> (B, c, 1 + k, H/f, W/f), causal in time (the first
    frame alone, then r frames per latent frame); r = 2^(temporal downsamplings), f = 2^(levels - 1)."""

    diffusers_class = "AutoencoderKLWan"

    def configure(self) -> None:
        cfg = self.vae.config
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1)
        self.temporal_factor = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"latents_mean and latents_std must have z_dim={cfg.z_dim} entries")
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    def latent_frames(self, frames: int) -> int:
        r = self.temporal_factor
        if frames < 1 or (frames - 1) % r:
            raise ValueError(f"the Wan VAE needs 1 + {r}k frames (1, {1 + r}, {1 + 2 * r}, ...), got {frames}")
        return 1 + (frames - 1) // r

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        # video (B, C, T, H, W) in [-1, 1] -> latents (B, c, t, h, w), normalized per channel
        self.latent_shape(*video.shape[2:])
        mean = self.vae.encode(video.to(self.dtype)).latent_dist.mean.float()
        return (mean - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        # latents (B, c, t, h, w) -> video (B, C, 1 + r (t - 1), H, W), about [-1, 1]
        z = (latents.float() * self.std + self.mean).to(self.dtype)
        return self.vae.decode(z).sample.float()
