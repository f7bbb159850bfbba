"""The two values that cross every layer of vdm, and the shape legend used throughout.

Shape legend:
    B batch, C channels, T frames, H height, W width,
    L text tokens, D feature width, S spatial tokens per frame (h * w after patching).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class VideoBatch:
    """A batch of captioned clips. An image is a clip with T = 1."""

    video: Tensor  # (B, C, T, H, W) uint8 in [0, 255]; pixels() gives float in [-1, 1]
    captions: list[str]  # B captions
    keys: list[str]  # B sample keys, unique within a shard set
    fps: Tensor  # (B,) frames per second of the sampled clip
    stream_state: dict | None = None  # where the data stream stood after this batch (see vdm.data.pipeline)

    def __len__(self) -> int:
        return self.video.shape[0]

    def pixels(self) -> Tensor:
        """(B, C, T, H, W) float32 in [-1, 1], computed where the batch is (after the copy to the device)."""
        return self.video.float().div_(127.5).sub_(1.0)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> VideoBatch:
        """The batch on `device`. Copies to an accelerator do not block the host (None: non-blocking unless the
        target is the CPU, where a non-blocking copy from a GPU could be read before it lands); from pinned
        memory (the loader pins on a GPU machine) they overlap with the work already queued."""
        if non_blocking is None:
            non_blocking = torch.device(device).type != "cpu"
        copy = {"non_blocking": non_blocking}
        return replace(self, video=self.video.to(device, **copy), fps=self.fps.to(device, **copy))

    def pin_memory(self) -> VideoBatch:
        return replace(self, video=self.video.pin_memory(), fps=self.fps.pin_memory())


@dataclass
class TextCond:
    """What the network reads from a caption."""

    tokens: Tensor  # (B, L, D) per-token features
    mask: Tensor  # (B, L) bool, True where a token is real (not padding)
    pooled: Tensor  # (B, D) one vector per caption

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> TextCond:
        return TextCond(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))
