"""Multi-head attention shared by the spatial, temporal and cross-attention branches.

Shape legend (see vdm/types.py): N attention batch (B, B*T or B*S depending on the branch),
S query tokens, L context tokens, D width, Dc context width, nh heads, hd head width.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class Attention(nn.Module):
    """Self-attention when `context` is None, cross-attention to `context` otherwise.

    `qk_norm` applies RMSNorm to each head's queries and keys, which keeps attention logits bounded
    in large or low-precision runs (Dehghani et al. 2023, "Scaling Vision Transformers to 22B").
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        if heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads (dim={dim}, heads={heads})")
        self.heads = heads
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        # x (N, S, D), context (N, L, Dc), context_mask (N, L) bool with True = attend
        source = x if context is None else context
        q = rearrange(self.to_q(x), "n s (nh hd) -> n nh s hd", nh=self.heads)
        k, v = rearrange(self.to_kv(source), "n l (two nh hd) -> two n nh l hd", two=2, nh=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)

        attn_mask = None
        has_any = None
        if context_mask is not None:
            # A row with no real token (an empty caption) would softmax over nothing and give NaN;
            # let it attend everywhere and zero its result below, so it reads as "no text".
            has_any = context_mask.any(dim=-1)  # (N,)
            safe_mask = context_mask | ~rearrange(has_any, "n -> n 1")
            attn_mask = rearrange(safe_mask, "n l -> n 1 1 l")  # broadcast over heads and queries

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, nh, S, hd)
        if has_any is not None:
            out = out * rearrange(has_any, "n -> n 1 1 1").to(out.dtype)
        out = rearrange(out, "n nh s hd -> n s (nh hd)")
        return self.proj(out)
