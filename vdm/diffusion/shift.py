"""The timestep shift of Esser et al. 2024 (SD3, Sec. 5.3.2, Eq. 23), fixed or from the clip's size.

    t' = s t / (1 + (s - 1) t)

keeps t = 0 and t = 1 where they are and, for s > 1, moves every time in between toward the noise.
More pixels (and more frames) carry more redundant signal, so the same noise level destroys less of
it: larger and longer clips need more time at high noise. SD3 takes s = sqrt(m / n) for m pixels
against a reference of n; vdm counts latent T * H * W, so that length shifts as resolution does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = shift t / (1 + (shift - 1) t) (SD3 Eq. 23), computed in float64 and returned in t's dtype."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (shift={shift!r})")
    if shift == 1.0:
        return t  # the identity, bit for bit: unshifted draws stay exactly what they were
    t64 = t.double()
    return (shift * t64 / (1 + (shift - 1) * t64)).to(t.dtype)


def shift_for_shape(shape: Sequence[int], shift: float, reference: Sequence[int] | None) -> float:
    """The shift for latents of `shape` (B, C, T, H, W): `shift` at the reference (T, H, W), scaled by
    sqrt(T H W / reference T H W) elsewhere (SD3 Sec. 5.3.2, with frames counted like pixels).
    Without a reference, `shift` everywhere."""
    if reference is None:
        return shift
    if len(shape) != 5:
        raise ValueError(f"a shape-dependent shift needs (B, C, T, H, W) latents, got shape {tuple(shape)}")
    return shift * math.sqrt(math.prod(shape[-3:]) / math.prod(reference))
