"""Autoencoders between videos and the latents the network is trained on.

The diffusers VAEs (vdm/autoencoders/diffusers_vae.py: KLAutoencoder, WanAutoencoder) import diffusers; configs
name them by their module so that a pixel-space run never does.
"""

from vdm.autoencoders.identity import IdentityAutoencoder

__all__ = ["IdentityAutoencoder"]
