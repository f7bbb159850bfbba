"""vdm: train text-to-video diffusion transformers, from a laptop to many GPU nodes."""

from vdm._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
