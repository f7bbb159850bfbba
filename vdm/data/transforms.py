"""Decoded frames -> the clip tensor: resize to cover, crop; kept uint8 until it reaches the device."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def frames_to_clip(
    frames: np.ndarray, height: int, width: int, crop_offset: tuple[float, float] = (0.5, 0.5)
) -> Tensor:
    """(T, H, W, 3) uint8 -> (3, T, height, width) uint8, contiguous.

    The frames are scaled (keeping their aspect ratio) to the smallest size that covers height x width,
    then cropped. crop_offset places the crop along each axis: (0.5, 0.5) centres it, random offsets in
    [0, 1] give a random crop. The resize runs on uint8 in channels-last layout, torch's fast path
    (several times faster than in float, within one grey level of it); scaling to [-1, 1] happens on the
    device (VideoBatch.pixels), so workers and the host-to-device copy move a quarter of the bytes.
    """
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, C, H, W) view, channels-last memory
    source_height, source_width = video.shape[-2:]
    scale = max(height / source_height, width / source_width)
    if scale != 1.0:
        new_size = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
        video = F.interpolate(video, size=new_size, mode="bilinear", antialias=True, align_corners=False)
    top = round((video.shape[-2] - height) * crop_offset[0])
    left = round((video.shape[-1] - width) * crop_offset[1])
    video = video[:, :, top : top + height, left : left + width]
    return rearrange(video, "t c h w -> c t h w").contiguous()
