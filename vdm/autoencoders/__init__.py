"""Autoencoders between videos and the latents the network is trained on."""

from vdm.autoencoders.identity import IdentityAutoencoder

__all__ = ["IdentityAutoencoder"]
