"""Decoded frames -> the model's clip tensor: resize the shorter side, crop, scale to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def frames_to_clip(frames: np.ndarray, size: int, crop_offset: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """(T, H, W, 3) uint8 -> (3, T, size, size) float32 in [-1, 1].

    crop_offset places the square crop along the longer side: (0.5, 0.5) centres it, random
    offsets in [0, 1] give a random crop.
    """
    video = rearrange(torch.from_numpy(frames), "t h w c -> t c h w").float()
    height, width = video.shape[-2:]
    if min(height, width) != size:
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        video = F.interpolate(video, size=new_size, mode="bilinear", antialias=True, align_corners=False)
    height, width = video.shape[-2:]
    top = round((height - size) * crop_offset[0])
    left = round((width - size) * crop_offset[1])
    video = video[:, :, top : top + size, left : left + size]
    return rearrange(video / 127.5 - 1.0, "t c h w -> c t h w").clamp_(-1.0, 1.0)
