"""The denoising network: a factorized space-time diffusion transformer."""

from vdm.models.blocks import SpaceTimeBlock
from vdm.models.dit import SpaceTimeDiT

__all__ = ["SpaceTimeBlock", "SpaceTimeDiT"]
