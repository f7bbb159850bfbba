"""Exponential moving average of the network's weights (pure PyTorch; the module drives it).

ema <- decay_n * ema + (1 - decay_n) * weights after each optimizer step that was applied, with
decay_n = min(decay, (1 + n) / (10 + n)) during warm-up (n = updates so far; the schedule of
TensorFlow's ExponentialMovingAverage num_updates and diffusers' EMAModel), so that an early EMA is
not dominated by the random initialization.

The EMA is kept in float32 whatever the weights' dtype (DeepSpeed casts the module to bf16; a bf16
average would lose every update smaller than its 8-bit mantissa can hold at decay 0.9999).

It averages, and is swapped into, whatever tensors it is given by name: the parameters where every rank holds
them, each rank's own shard of them under ZeRO-3 and FSDP2 (vdm.distributed.shards). A sharded EMA is then
kept per rank, 4 bytes x parameters / world size, and updated without any communication.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor


class EMA:
    """Settings and state of one EMA.

    decay: the long-run decay per optimizer step. warmup: ramp the decay as above.
    update_every: update every k applied steps, with decay^k, so that the averaging horizon in steps
    does not depend on k. start_step: the EMA starts as a copy of the weights at this step.
    """

    def __init__(
        self,
        enabled: bool = True,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every: int = 1,
        start_step: int = 0,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) (decay={decay!r})")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1 (update_every={update_every!r})")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0 (start_step={start_step!r})")
        self.enabled, self.decay, self.warmup = enabled, float(decay), warmup
        self.update_every, self.start_step = update_every, start_step
        self.weights: dict[str, Tensor] = {}  # parameter name -> float32 average
        self.num_updates = 0

    def decay_at(self, num_updates: int) -> float:
        """The decay of the update that follows `num_updates` earlier ones, per optimizer step."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def step(
        self, tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], step: int, applied: Tensor | None = None
    ) -> bool:
        """Called after optimizer step `step` (1-based) was applied; returns whether the EMA may have changed.

        `tensors`: {name: tensor} (or (name, tensor) pairs) to average: the parameters, or this rank's shards.

        `applied`: where the optimizer skips non-finite steps on the device, a bool tensor saying whether this
        step was applied; the average then moves by zero on a skipped step, decided on the device, not the host
        (the warm-up count still advances: a skipped step changes the decay schedule by one step).
        """
        if not self.enabled or step < self.start_step:
            return False
        named = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
        if not self.weights:  # the first update: a copy (of unchanged weights, if this step was skipped)
            self.weights = {name: p.detach().float().clone() for name, p in named}
            return True
        if (step - self.start_step) % self.update_every:
            return False
        weight = 1.0 - self.decay_at(self.num_updates) ** self.update_every
        averages = [self.weights[name] for name, _ in named]
        if applied is not None:
            # a tensor weight, one per tensor: the overload with a single tensor weight reads it to the host
            weight = [applied.float() * weight] * len(averages)  # (): 0 on a skipped step
        torch._foreach_lerp_(averages, [p.detach().float() for _, p in named], weight)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict:
        return {"weights": self.weights, "num_updates": self.num_updates}

    def load_state_dict(
        self, state: dict, device: torch.device | None = None, like: Mapping[str, Tensor] | None = None
    ) -> None:
        """`like`: the tensors this EMA averages; the loaded weights must have their names and shapes, and go to
        their devices (a checkpoint of another model, or sharded another way, is refused by name)."""
        weights = state["weights"]
        if like is not None and weights:
            problems = [f"missing {name}" for name in sorted(set(like) - set(weights))]
            problems += [f"unexpected {name}" for name in sorted(set(weights) - set(like))]
            problems += [
                f"{name} is {tuple(weights[name].shape)} there, {tuple(tensor.shape)} here"
                for name, tensor in like.items()
                if name in weights and weights[name].shape != tensor.shape
            ]
            if problems:
                raise ValueError(f"the checkpoint's EMA does not fit this run's parameters: {'; '.join(problems[:3])}")
        self.weights = {
            name: w.to(device=like[name].device if like is not None else device, dtype=torch.float32)
            for name, w in weights.items()
        }
        self.num_updates = int(state["num_updates"])

    def to(self, device: torch.device) -> EMA:
        self.weights = {name: w.to(device) for name, w in self.weights.items()}
        return self

    @contextmanager
    def swapped_in(self, tensors: Mapping[str, Tensor], written: Callable[[], None] | None = None) -> Iterator[None]:
        """The EMA weights copied into `tensors` (what `step` averages) for the duration, then the tensors' own
        values back (sampling, evaluation). `written` is called after each of the two copies: a sharding strategy
        may hold gathered copies of the parameters to drop (vdm.distributed.shards.shards_written).

        Without EMA weights yet (EMA off, or before start_step) nothing is copied.
        """
        if not self.weights:
            yield
            return
        backup = {}
        with torch.no_grad():
            for name, average in self.weights.items():
                backup[name] = tensors[name].clone()
                tensors[name].copy_(average)
        if written is not None:
            written()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    tensors[name].copy_(saved)
            if written is not None:
                written()

    def __repr__(self) -> str:
        return (
            f"EMA(enabled={self.enabled}, decay={self.decay}, warmup={self.warmup}, "
            f"update_every={self.update_every}, start_step={self.start_step})"
        )
