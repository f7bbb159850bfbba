"""Patch, position and timestep embeddings.

Position encodings are fixed sin/cos tables computed on the fly rather than stored, so a model
trained at one resolution or clip length runs at any other without resizing a buffer.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Transformer sin/cos encoding of (possibly fractional) positions (N,) -> (N, dim), float32."""
    if dim % 2 != 0:
        raise ValueError(f"dim must be even for a sin/cos encoding (dim={dim})")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = rearrange(positions.float(), "n -> n 1") * rearrange(omega, "f -> 1 f")  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sincos_2d(
    h: int,
    w: int,
    dim: int,
    device: torch.device | str | None = None,
    base_size: int | None = None,
    interpolation_scale: float = 1.0,
) -> Tensor:
    """2-D sin/cos encoding of an h x w grid -> (h*w, dim), float32, row-major like '(h w)'.

    base_size None (vdm's own): integer positions; the first half of the channels encodes the row, the second
    the column. base_size given: the grid of DiT and PixArt as diffusers computes it
    (`get_2d_sincos_pos_embed`), so that their weights load exactly: positions scaled so that the grid spans
    base_size patches along each axis at any size (i / (n / base_size) / interpolation_scale), the column half
    first, computed in float64 as diffusers does, then rounded to float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sin/cos encoding (dim={dim})")
    if base_size is None:
        rows = torch.arange(h, dtype=torch.float32, device=device)
        cols = torch.arange(w, dtype=torch.float32, device=device)
        grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
        emb_r = sincos_1d(rearrange(grid_r, "h w -> (h w)"), dim // 2)
        emb_c = sincos_1d(rearrange(grid_c, "h w -> (h w)"), dim // 2)
        return torch.cat([emb_r, emb_c], dim=-1)
    exact = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64  # mps has no float64
    rows = torch.arange(h, dtype=exact, device=device) / (h / base_size) / interpolation_scale
    cols = torch.arange(w, dtype=exact, device=device) / (w / base_size) / interpolation_scale
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    emb_c = _sincos_1d_exact(rearrange(grid_c, "h w -> (h w)"), dim // 2)
    emb_r = _sincos_1d_exact(rearrange(grid_r, "h w -> (h w)"), dim // 2)
    return torch.cat([emb_c, emb_r], dim=-1).float()


def _sincos_1d_exact(positions: Tensor, dim: int) -> Tensor:
    """sincos_1d in the positions' own dtype (float64 for the diffusers-compatible grid)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=positions.dtype, device=positions.device) / half)
    angles = rearrange(positions, "n -> n 1") * rearrange(omega, "f -> 1 f")
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class PatchEmbed3d(nn.Module):
    """Non-overlapping (pt, p, p) patches -> tokens, one row of spatial tokens per latent frame."""

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        # x (B, C, T, H, W) -> tokens (B, t, s, D) and grid (t, h, w) with s = h * w
        T, H, W = x.shape[-3:]
        pt, ph, pw = self.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"input (T, H, W)=({T}, {H}, {W}) is not divisible by patch_size={self.patch_size}")
        tokens = self.proj(x)  # (B, D, t, h, w)
        t, h, w = tokens.shape[-3:]
        return rearrange(tokens, "b d t h w -> b t (h w) d"), (t, h, w)


class TimestepEmbedding(nn.Module):
    """Diffusion time t in [0, 1] (B,) -> (B, dim).

    t is scaled by 1000 before the sin/cos features so that the frequencies span the same range
    as in DiT, which was tuned for 1000 integer steps.
    """

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        if freq_dim <= 0 or freq_dim % 2 != 0:
            raise ValueError(f"freq_dim must be a positive even number (freq_dim={freq_dim})")
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = rearrange(t.float() * 1000, "b -> b 1") * rearrange(freqs, "f -> 1 f")  # (B, freq_dim/2)
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, freq_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))
