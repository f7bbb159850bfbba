"""Multi-head attention shared by the spatial, temporal and cross-attention branches.

Shape legend (see vdm/types.py): N attention batch (B, B*T or B*S depending on the branch),
S query tokens, L context tokens, D width, Dc context width, nh heads, hd head width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA's kernels by the names configs use (torch.nn.attention.SDPBackend)
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def parse_backends(names: str | Sequence[str] | None) -> list[SDPBackend] | None:
    """None or "auto": SDPA picks per call; a name or a list of names: SDPA picks only among those."""
    if names is None or names == "auto":
        return None
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in BACKENDS]
    if not names or unknown:
        raise ValueError(f"attention_backend must be auto, or one or a list of {', '.join(BACKENDS)} (got {names!r})")
    return [BACKENDS[n] for n in names]


def check_backends(
    backends: list[SDPBackend] | None, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> None:
    """Run SDPA once as vdm's attention calls it (self-attention without a mask, cross-attention with a boolean
    key mask) under `backends`, at the run's device and dtype; ValueError saying what can run if it cannot."""
    if backends is None:
        return
    q = torch.randn(2, heads, 8, head_dim, device=device, dtype=dtype)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool, device=device)

    def runs(chosen: list[SDPBackend]) -> str | None:
        for name, attn_mask in (("self-attention", None), ("masked cross-attention", mask)):
            try:
                with sdpa_kernel(chosen):
                    F.scaled_dot_product_attention(q, q, q, attn_mask=attn_mask)
            except RuntimeError as error:
                return f"{name}: {str(error).splitlines()[0]}"
        return None

    failure = runs(backends)
    if failure is not None:
        usable = [name for name, backend in BACKENDS.items() if runs([backend]) is None]
        chosen = [name for name, backend in BACKENDS.items() if backend in backends]
        raise ValueError(
            f"{chosen} cannot run vdm's attention on {device.type} in {dtype} with head width {head_dim} "
            f"({failure}); usable here one by one: {usable or 'none'} (flash takes no attention mask on a GPU, "
            "so the masked cross-attention needs another kernel beside it, e.g. [flash, efficient])"
        )


class Attention(nn.Module):
    """Self-attention when `context` is None, cross-attention to `context` otherwise.

    `qk_norm` applies RMSNorm to each head's queries and keys, which keeps attention logits bounded
    in large or low-precision runs (Dehghani et al. 2023, "Scaling Vision Transformers to 22B").
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None = None,
        qk_norm: bool = True,
        backends: list[SDPBackend] | None = None,
    ):
        super().__init__()
        self.backends = backends  # None: SDPA picks its kernel per call
        if heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads (dim={dim}, heads={heads})")
        self.heads = heads
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None, sequence_parallel=None
    ) -> Tensor:
        # x (N, S, D), context (N, L, Dc), context_mask (N, L) bool with True = attend.
        # sequence_parallel (self-attention only): x holds this rank's part of the sequence; q, k, v are exchanged
        # for all of the sequence and nh / sp of the heads before SDPA, and back after it (vdm/distributed/sequence.py)
        source = x if context is None else context
        q = rearrange(self.to_q(x), "n s (nh hd) -> n nh s hd", nh=self.heads)
        k, v = rearrange(self.to_kv(source), "n l (two nh hd) -> two n nh l hd", two=2, nh=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if sequence_parallel is not None:
            if context is not None:
                raise ValueError("sequence_parallel splits self-attention only; cross-attention stays local")
            q, k, v = (sequence_parallel.heads_to_frames(a) for a in (q, k, v))  # (N, nh/sp, S*sp, hd)

        attn_mask = None
        has_any = None
        if context_mask is not None:
            # A row with no real token (an empty caption) would softmax over nothing and give NaN;
            # let it attend everywhere and zero its result below, so it reads as "no text".
            has_any = context_mask.any(dim=-1)  # (N,)
            safe_mask = context_mask | ~rearrange(has_any, "n -> n 1")
            attn_mask = rearrange(safe_mask, "n l -> n 1 1 l")  # broadcast over heads and queries

        if self.backends is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, nh, S, hd)
        else:
            with sdpa_kernel(self.backends):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if sequence_parallel is not None:
            out = sequence_parallel.frames_to_heads(out)  # (N, nh, S, hd)
        if has_any is not None:
            out = out * rearrange(has_any, "n -> n 1 1 1").to(out.dtype)
        out = rearrange(out, "n nh s hd -> n s (nh hd)")
        return self.proj(out)
