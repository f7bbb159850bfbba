"""Frozen text encoders that turn captions into a TextCond."""

from vdm.text.open_clip_encoder import OpenCLIPTextEncoder

__all__ = ["OpenCLIPTextEncoder"]
