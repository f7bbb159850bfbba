"""The factorized space-time transformer block.

Shape legend (see vdm/types.py): B batch, T latent frames, S spatial tokens per frame,
L text tokens, D width.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from vdm.models.attention import Attention
from vdm.models.embeddings import sincos_1d


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # scale is a residual around 1, so a zero modulation leaves the normalized input unchanged
    return x * (1 + scale) + shift


class SpaceTimeBlock(nn.Module):
    """Spatial attention, temporal attention, cross-attention to text, then an MLP.

    Each branch is `x + gate * f(modulate(norm(x), shift, scale))`. The (shift, scale, gate) rows
    are "adaLN-single" (PixArt-alpha, Chen et al. 2023; Open-Sora STDiT): one global vector per
    sample computed by the DiT, plus a learned per-block table held here. The table starts at zero,
    so with a zero global modulation every gate is 0 and the block is the identity.

    The temporal rows live in their own parameter `temporal_modulation`, never in the 9-row table,
    so an image model (temporal=False) loads into a video model by parameter name and the temporal
    branch keeps its silent init.

    cross_modulation=False is PixArt's block: the cross-attention reads the tokens as they are (no norm,
    no shift, scale or gate: `x + cross_attn(x)`), and the table has 6 rows (spatial, then MLP).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        temporal: bool = True,
        qk_norm: bool = True,
        attention_backends: list[SDPBackend] | None = None,
        cross_modulation: bool = True,
    ):
        super().__init__()
        self.enable_temporal = temporal
        self.cross_modulation = cross_modulation
        # selective activation checkpointing: recompute only the attention branches in the backward pass
        self.checkpoint_attention = False
        # sequence parallelism, set from outside (SpaceTimeDiT.set_sequence_parallel): None, or the FrameSplit of
        # vdm/distributed/sequence.py when x holds this rank's frames only; then the temporal attention exchanges
        # its heads for all frames and back, and the other branches, which read one frame at a time, stay local
        self.sequence_parallel = None
        # No affine parameters: the modulation plays that role.
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.spatial_attn = Attention(dim, heads, qk_norm=qk_norm, backends=attention_backends)
        if temporal:
            self.temporal_attn = Attention(dim, heads, qk_norm=qk_norm, backends=attention_backends)
            # rows: shift, scale, gate of the temporal branch
            self.temporal_modulation = nn.Parameter(torch.zeros(3, dim))
        self.cross_attn = Attention(dim, heads, context_dim=dim, qk_norm=qk_norm, backends=attention_backends)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # rows: shift, scale, gate for spatial, cross (with cross_modulation) and mlp branches, in that order
        self.modulation = nn.Parameter(torch.zeros(self.modulation_rows(cross_modulation), dim))

    @staticmethod
    def modulation_rows(cross_modulation: bool) -> int:
        return 9 if cross_modulation else 6

    def forward(
        self,
        x: Tensor,  # (B, T, S, D)
        context: Tensor,  # (B, L, D) text tokens already projected to width D
        context_mask: Tensor | None,  # (B, L) bool, True = real token
        modulation: Tensor,  # (B, 9 or 6, D) global modulation from the DiT
        temporal_modulation: Tensor | None = None,  # (B, 3, D), required when enable_temporal
    ) -> Tensor:
        B, T, S, D = x.shape
        recompute = self.checkpoint_attention and self.training and torch.is_grad_enabled()

        def attend(attention: Attention, h: Tensor, **context) -> Tensor:
            # with checkpoint_attention, the attention's activations are recomputed in the backward pass
            if recompute:
                return checkpoint(attention, h, use_reentrant=False, **context)
            return attention(h, **context)

        mod = modulation + self.modulation  # (B, 9 or 6, D)
        mod = rearrange(mod, "b n d -> n b 1 1 d")  # each row broadcasts over (T, S)
        if self.cross_modulation:
            shift_s, scale_s, gate_s, shift_c, scale_c, gate_c, shift_m, scale_m, gate_m = mod
        else:
            shift_s, scale_s, gate_s, shift_m, scale_m, gate_m = mod

        # (1) spatial: tokens attend within their own frame
        h = modulate(self.norm(x), shift_s, scale_s)
        h = attend(self.spatial_attn, rearrange(h, "b t s d -> (b t) s d"))
        x = x + gate_s * rearrange(h, "(b t) s d -> b t s d", b=B)

        # (2) temporal: each spatial location attends across frames
        if self.enable_temporal:
            if temporal_modulation is None:
                raise ValueError("temporal_modulation is required by a block with enable_temporal=True")
            tmod = rearrange(temporal_modulation + self.temporal_modulation, "b n d -> n b 1 1 d")
            shift_t, scale_t, gate_t = tmod
            h = modulate(self.norm(x), shift_t, scale_t)
            h = rearrange(h, "b t s d -> (b s) t d")
            # attention is permutation-invariant; the encoding tells the branch the frame order (global frame
            # indices: under sequence parallelism this rank's T frames start at the split's offset)
            split = self.sequence_parallel
            first = 0 if split is None else split.frame_offset(T)
            frame_pos = sincos_1d(torch.arange(first, first + T, device=x.device), D).to(h.dtype)  # (T, D)
            h = attend(self.temporal_attn, h + frame_pos, sequence_parallel=split)
            x = x + gate_t * rearrange(h, "(b s) t d -> b t s d", b=B)

        # (3) cross-attention: every token of the clip reads the caption
        h = modulate(self.norm(x), shift_c, scale_c) if self.cross_modulation else x
        h = attend(self.cross_attn, rearrange(h, "b t s d -> b (t s) d"), context=context, context_mask=context_mask)
        h = rearrange(h, "b (t s) d -> b t s d", t=T)
        x = x + (gate_c * h if self.cross_modulation else h)

        # (4) MLP
        h = self.mlp(modulate(self.norm(x), shift_m, scale_m))
        return x + gate_m * h
