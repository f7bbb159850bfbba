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
    """A batch of captioned clips. An image is a clip with T = 1.

    A batch read from a latent cache (vdm.data.cache) carries its clips already encoded: `latents` and `text`
    instead of `video`.
    """

    video: Tensor | None  # (B, C, T, H, W) uint8 in [0, 255]; pixels() gives float in [-1, 1]
    captions: list[str]  # B captions
    keys: list[str]  # B sample keys, unique within a shard set
    fps: Tensor  # (B,) frames per second of the sampled clip
    stream_state: dict | None = None  # where the data stream stood after this batch (see vdm.data.pipeline)
    latents: Tensor | None = None  # (B, c, t, h, w) the autoencoder's latents of the clips, in the cache's dtype
    text: TextCond | None = None  # the captions' text-encoder features, in the cache's dtype

    def __len__(self) -> int:
        return len(self.keys)

    def pixels(self) -> Tensor:
        """(B, C, T, H, W) float32 in [-1, 1], computed where the batch is (after the copy to the device)."""
        if self.video is None:
            raise ValueError("a batch from a latent cache has latents, not pixels")
        return self.video.float().div_(127.5).sub_(1.0)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> VideoBatch:
        """The batch on `device`. Copies to an accelerator do not block the host (None: non-blocking unless the
        target is the CPU, where a non-blocking copy from a GPU could be read before it lands); from pinned
        memory (the loader pins on a GPU machine) they overlap with the work already queued."""
        if non_blocking is None:
            non_blocking = torch.device(device).type != "cpu"
        copy = {"non_blocking": non_blocking}
        return replace(
            self,
            video=None if self.video is None else self.video.to(device, **copy),
            fps=self.fps.to(device, **copy),
            latents=None if self.latents is None else self.latents.to(device, **copy),
            text=None if self.text is None else self.text.to(device, **copy),
        )

    def pin_memory(self) -> VideoBatch:
        return replace(
            self,
            video=None if self.video is None else self.video.pin_memory(),
            fps=self.fps.pin_memory(),
            latents=None if self.latents is None else self.latents.pin_memory(),
            text=None if self.text is None else self.text.pin_memory(),
        )


@dataclass
class TextCond:
    """What the network reads from a caption."""

    tokens: Tensor  # (B, L, D) per-token features
    mask: Tensor  # (B, L) bool, True where a token is real (not padding)
    pooled: Tensor  # (B, D) one vector per caption

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, **copy) -> TextCond:
        return TextCond(self.tokens.to(device, **copy), self.mask.to(device, **copy), self.pooled.to(device, **copy))

    def pin_memory(self) -> TextCond:
        return TextCond(self.tokens.pin_memory(), self.mask.pin_memory(), self.pooled.pin_memory())

    def float(self) -> TextCond:
        return TextCond(self.tokens.float(), self.mask, self.pooled.float())

    def padded(self, length: int) -> TextCond:
        """The same captions with L = `length` tokens: zero features, masked out, after the real ones."""
        pad = length - self.tokens.shape[1]
        if pad <= 0:
            return self
        return TextCond(
            torch.nn.functional.pad(self.tokens, (0, 0, 0, pad)),
            torch.nn.functional.pad(self.mask, (0, pad), value=False),
            self.pooled,
        )


def with_rows(cond: TextCond, rows: list[bool], other: TextCond) -> TextCond:
    """`cond` with the captions where `rows` is True replaced by the one caption of `other` (e.g. the empty one)."""
    length = max(cond.tokens.shape[1], other.tokens.shape[1])
    cond, other = cond.padded(length), other.padded(length)
    take = torch.tensor(rows, device=cond.tokens.device)
    return TextCond(
        torch.where(take[:, None, None], other.tokens.to(cond.tokens.dtype), cond.tokens),
        torch.where(take[:, None], other.mask, cond.mask),
        torch.where(take[:, None], other.pooled.to(cond.pooled.dtype), cond.pooled),
    )
