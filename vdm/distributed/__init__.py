"""Parallelism from outside the model: Lightning strategies built from config."""

from vdm.distributed.strategies import DDP, FSDP2, DeepSpeedZeRO

__all__ = ["DDP", "DeepSpeedZeRO", "FSDP2"]
