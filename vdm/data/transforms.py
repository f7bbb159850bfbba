"""Decoded frames -> the model's clip tensor: resize to cover, crop, scale to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def frames_to_clip(
    frames: np.ndarray, height: int, width: int, crop_offset: tuple[float, float] = (0.5, 0.5)
) -> Tensor:
    """(T, H, W, 3) uint8 -> (3, T, height, width) float32 in [-1, 1].

    The frames are scaled (keeping their aspect ratio) to the smallest size that covers height x width,
    then cropped. crop_offset places the crop along each axis: (0.5, 0.5) centres it, random offsets
    in [0, 1] give a random crop.
    """
    video = rearrange(torch.from_numpy(frames), "t h w c -> t c h w").float()
    source_height, source_width = video.shape[-2:]
    scale = max(height / source_height, width / source_width)
    if scale != 1.0:
        new_size = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
        video = F.interpolate(video, size=new_size, mode="bilinear", antialias=True, align_corners=False)
    top = round((video.shape[-2] - height) * crop_offset[0])
    left = round((video.shape[-1] - width) * crop_offset[1])
    video = video[:, :, top : top + height, left : left + width]
    return rearrange(video / 127.5 - 1.0, "t c h w -> c t h w").clamp_(-1.0, 1.0)
