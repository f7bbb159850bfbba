"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network, not a method of it.

Shape legend (see vdm/types.py): B batch, L text tokens, D text width.
Time convention: t = 0 is data, t = 1 is noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm.types import TextCond

Net = Callable[[Tensor, Tensor, TextCond], Tensor]  # net(x (B, ...), t (B,), cond) -> (B, ...)
ModelFn = Callable[[Tensor, Tensor], Tensor]  # model_fn(x (B, ...), t (B,)) -> the net's output, guided


def cat_text_conds(a: TextCond, b: TextCond) -> TextCond:
    """Concatenate along the batch; the shorter token length is padded with zeros and mask False."""
    length = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(cond: TextCond) -> tuple[Tensor, Tensor]:
        extra = length - cond.tokens.shape[1]
        return F.pad(cond.tokens, (0, 0, 0, extra)), F.pad(cond.mask, (0, extra), value=False)

    (tokens_a, mask_a), (tokens_b, mask_b) = pad(a), pad(b)
    return TextCond(
        tokens=torch.cat([tokens_a, tokens_b]),  # (Ba + Bb, L, D)
        mask=torch.cat([mask_a, mask_b]),  # (Ba + Bb, L)
        pooled=torch.cat([a.pooled, b.pooled]),  # (Ba + Bb, D)
    )


def _expand(cond: TextCond, batch: int) -> TextCond:
    # one unconditional caption (often "") serves a whole batch
    if len(cond) == batch:
        return cond
    if len(cond) != 1:
        raise ValueError(f"uncond must have batch size 1 or {batch} (the cond batch), got {len(cond)}")
    return TextCond(
        tokens=cond.tokens.expand(batch, -1, -1),
        mask=cond.mask.expand(batch, -1),
        pooled=cond.pooled.expand(batch, -1),
    )


def classifier_free_guidance(
    net: Net,
    cond: TextCond,
    uncond: TextCond,
    scale: float,
    interval: tuple[float, float] | list[float] = (0.0, 1.0),
) -> ModelFn:
    """model_fn(x, t) = out_uncond + scale (out_cond - out_uncond) (Ho & Salimans 2022, with scale = 1 + w).

    The network's output is linear in (x0, noise) under every objective (vdm/diffusion/preconditioning.py),
    so guiding it is guiding the implied x0 and noise, whatever the parameterization.

    Guidance applies only for t inside `interval` = [low, high], per sample; outside, the conditional
    output alone (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval": guidance at high
    noise pulls samples toward a few modes, at low noise it does little). Both branches run in one
    batched forward of [x, x]; a call with no sample inside the interval runs only the conditional
    forward, and so does every call at scale = 1. scale = 0 is unconditional.
    """
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1 (interval={list(interval)!r})")
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)

    low, high = float(interval[0]), float(interval[1])
    both = cat_text_conds(cond, _expand(uncond, len(cond)))  # (2B, L, D): cond first, then uncond
    everywhere = (low, high) == (0.0, 1.0)

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        inside = (t >= low) & (t <= high)  # (B,)
        if not everywhere and not inside.any():
            return net(x, t, cond)
        out_cond, out_uncond = net(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        if everywhere:
            return guided
        return torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), guided, out_cond)

    return model_fn
