"""What the running strategy does, answered in one place: nothing outside vdm/distributed looks at its type.

The rest of vdm asks these functions, never `type(strategy).__name__` or `hasattr(..., "deepspeed_engine")`:
whether the strategy clips and skips steps by itself, this rank's part of a tensor, a tensor's full size, the
gradient norm it measured, how many steps it skipped, and which torch optimizer holds the states. The settings'
side (does a strategy shard the parameters, its name in messages) is on the settings classes in strategies.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def deepspeed_engine(strategy):
    """The DeepSpeed engine of a Lightning DeepSpeedStrategy, else None."""
    return getattr(strategy, "deepspeed_engine", None)


def steps_inside_engine(strategy) -> bool:
    """True where the strategy clips the gradients and skips a non-finite step itself, inside its optimizer step
    (DeepSpeed: gradient_clipping in its config, and its own overflow check); the module then must not."""
    return deepspeed_engine(strategy) is not None


def skipped_steps(strategy) -> int:
    """Optimizer steps the strategy itself skipped so far (DeepSpeed's count of non-finite steps; else 0)."""
    engine = deepspeed_engine(strategy)
    return int(engine.skipped_steps) if engine is not None else 0


def engine_gradient_norm(strategy) -> Tensor | None:
    """The gradient norm the strategy measured at its last step, where it measures it (DeepSpeed), else None."""
    engine = deepspeed_engine(strategy)
    norm = engine.get_global_grad_norm() if engine is not None else None
    return None if norm is None else torch.as_tensor(float(norm))


def full_value(tensor: Tensor) -> Tensor:
    """The whole value of a tensor that may be a DTensor (FSDP2: a sharded norm is a partial value per rank)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_part(tensor: Tensor) -> Tensor:
    """This rank's part of a parameter: its ZeRO-3 partition, its FSDP2 shard, or the tensor itself."""
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    return tensor


def full_numel(tensor: Tensor) -> int:
    """Elements of the whole parameter, also when this rank holds only a ZeRO-3 partition of it."""
    return tensor.ds_numel if hasattr(tensor, "ds_numel") else tensor.numel()


def innermost_optimizer(optimizer):
    """The torch optimizer that holds the states (Lightning and DeepSpeed wrap it)."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def strategy_name(strategy) -> str:
    """The strategy's name for reports (sharding/rank-N.json)."""
    return type(strategy).__name__
