"""The identity autoencoder: training and sampling in pixel space.

Shape legend (see vdm/types.py): B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from torch import Tensor, nn


class IdentityAutoencoder(nn.Module):
    """encode and decode return their input: latents are the (B, C, T, H, W) pixels in [-1, 1]."""

    # latent (T, H, W) = video (T, H, W) / factors
    spatial_factor = 1
    temporal_factor = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
            raise ValueError(f"channels must be a positive int (channels={channels!r})")
        self.channels = channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the latents of a clip of (frames, height, width): the same."""
        return frames, height, width

    def encode(self, video: Tensor) -> Tensor:
        return video

    def decode(self, latents: Tensor) -> Tensor:
        return latents
