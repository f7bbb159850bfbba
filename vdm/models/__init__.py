"""The denoising network: a factorized space-time diffusion transformer."""

from vdm.models.blocks import SpaceTimeBlock
from vdm.models.dit import SpaceTimeDiT
from vdm.models.weights import load_weights

__all__ = ["SpaceTimeBlock", "SpaceTimeDiT", "load_weights"]
