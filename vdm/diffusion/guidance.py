"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network, not a method of it.

Shape legend (see vdm/types.py): B batch, L text tokens, D text width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm.types import TextCond

Net = Callable[[Tensor, Tensor, TextCond], Tensor]
VelocityFn = Callable[[Tensor, Tensor], Tensor]


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


def classifier_free_guidance(net: Net, cond: TextCond, uncond: TextCond, scale: float) -> VelocityFn:
    """velocity_fn(x, t) = v_uncond + scale (v_cond - v_uncond) (Ho & Salimans 2022, with scale = 1 + w).

    Both branches run in one batched forward of [x, x]. scale = 1 is plain conditional sampling and
    runs only the conditional forward; scale = 0 is unconditional.
    """
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)

    both = cat_text_conds(cond, _expand(uncond, len(cond)))  # (2B, L, D): cond first, then uncond

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        v_cond, v_uncond = net(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return velocity_fn
