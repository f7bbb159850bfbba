from __future__ import annotations

import pytest
import torch

from vdm.autoencoders import IdentityAutoencoder


def test_round_trip_is_exact():
    ae = IdentityAutoencoder(channels=4)
    video = torch.rand(2, 4, 3, 8, 8) * 2 - 1
    latents = ae.encode(video)
    assert latents.shape == video.shape and torch.equal(ae.decode(latents), video)
    assert ae.latent_channels == 4 and ae.spatial_factor == 1 and ae.temporal_factor == 1
    assert list(ae.parameters()) == []
    assert IdentityAutoencoder().latent_channels == 3


def test_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels"):
        IdentityAutoencoder(channels=0)
