"""Analytic FLOP count of a SpaceTimeDiT: the numerator of model FLOPs utilization (MFU).

A matrix product of (m, k) by (k, n) counts 2*m*n*k FLOPs; attention counts its scores (Q K^T) and its
weighted sum (A V) the same way. Elementwise work (norms, activations, softmax, modulation, position
encodings) is left out, as in the PaLM paper's MFU (Chowdhery et al. 2022, Appendix B): it is a few
percent of a transformer's FLOPs and runs far below the matmul peak anyway.

The count reads only the network's configuration (widths, patch size, depth), never a parameter's
shape, so it is the same for a network whose parameters are sharded (FSDP2, ZeRO-3) or on the meta device.

Shape legend (see vdm/types.py): C latent channels, T latent frames, H, W latent height and width,
L text tokens, Dt text width, D model width, F MLP hidden width; after patching t frames, h x w patches
per frame, s = h * w tokens per frame, N = t * s tokens per clip.
"""

from __future__ import annotations

from torch import nn


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _attention(queries: int, keys: int, width: int) -> int:
    # scores (queries, keys) summed over every head's hd channels, then the same size for A V: the
    # heads split D, so the count depends on the width only
    return 2 * (2 * queries * keys * width)


def patch_grid(net: nn.Module, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patches of a latent clip (T, H, W); ValueError if the patch size does not divide it."""
    pt, ph, pw = net.patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent (T, H, W)=({frames}, {height}, {width}) is not divisible by {net.patch_size}")
    return frames // pt, height // ph, width // pw


def tokens_per_clip(net: nn.Module, frames: int, height: int, width: int) -> int:
    """Patch tokens of one latent clip (T, H, W): what the transformer's sequence length is made of."""
    t, h, w = patch_grid(net, frames, height, width)
    return t * h * w


def attention_flops(block: nn.Module, t: int, s: int, text_tokens: int) -> int:
    """The three attention branches of one SpaceTimeBlock (projections included), over t frames of s tokens."""
    D = block.mlp[0].in_features
    N, L = t * s, text_tokens
    flops = _linear(N, D, 3 * D) + _linear(N, D, D) + t * _attention(s, s, D)  # spatial: q, kv, out; in-frame
    if block.enable_temporal:
        flops += _linear(N, D, 3 * D) + _linear(N, D, D) + s * _attention(t, t, D)  # across frames, per location
    flops += _linear(N, D, D) + _linear(L, D, 2 * D) + _linear(N, D, D) + _attention(N, L, D)  # cross: q, kv, out
    return flops


def block_flops(block: nn.Module, t: int, s: int, text_tokens: int) -> int:
    """One SpaceTimeBlock over t frames of s tokens, reading L = text_tokens caption tokens."""
    D, F = block.mlp[0].in_features, block.mlp[0].out_features
    return attention_flops(block, t, s, text_tokens) + _linear(t * s, D, F) + _linear(t * s, F, D)  # + MLP


def recomputed_flops(net: nn.Module, t: int, s: int, text_tokens: int) -> int:
    """What activation checkpointing computes again in the backward pass: the forward of the checkpointed
    blocks (every `grad_checkpointing_every`-th), whole or only their attention (`grad_checkpointing_scope`)."""
    every = getattr(net, "grad_checkpointing_every", 1)
    part = attention_flops if getattr(net, "grad_checkpointing_scope", "block") == "attention" else block_flops
    return sum(part(block, t, s, text_tokens) for index, block in enumerate(net.blocks) if index % every == 0)


def forward_flops(net: nn.Module, frames: int, height: int, width: int, text_tokens: int) -> int:
    """FLOPs of one forward pass of a SpaceTimeDiT for one clip of latent shape (C, T, H, W) = (C, frames,
    height, width) and a caption of `text_tokens` tokens (the padded length the network is given)."""
    t, h, w = patch_grid(net, frames, height, width)
    s, N, L = h * w, t * h * w, text_tokens
    D, Dt = net.width, net.text_dim
    pt, ph, pw = net.patch_size
    patch = pt * ph * pw * net.in_channels
    rows = net.modulation[-1].out_features // D  # 9, or 6 without cross-attention modulation

    flops = _linear(N, patch, D)  # the patch embedding: a convolution with stride = kernel is a linear map
    flops += _linear(1, net.t_embedder.freq_dim, D) + _linear(1, D, D)  # timestep MLP
    flops += (_linear(1, Dt, D) + _linear(1, D, D)) if net.pooled_text else 0  # pooled caption MLP
    flops += _linear(L, Dt, D) + _linear(L, D, D)  # caption token MLP
    flops += _linear(1, D, rows * D) + (_linear(1, D, 3 * D) if net.temporal else 0)  # adaLN-single modulation
    flops += sum(block_flops(block, t, s, L) for block in net.blocks)
    # final layer: its modulation (none with a table), then tokens -> patches (and variances, if learned)
    flops += (0 if net.final.table else _linear(1, D, 2 * D)) + _linear(N, D, pt * ph * pw * net.out_channels)
    return flops


def train_flops_per_clip(
    net: nn.Module, frames: int, height: int, width: int, text_tokens: int, *, recompute: bool | None = None
) -> int:
    """FLOPs of one training step's forward and backward for one clip: 3 forwards (the backward computes
    gradients of both the activations and the weights, 2 matmuls for each forward one; Kaplan et al. 2020,
    Sec. 2.1), plus the forward that activation checkpointing recomputes (`recomputed_flops`).

    `recompute` defaults to the network's own `grad_checkpointing`. With recomputation counted this is
    the work the hardware does (what the PaLM paper calls HFU rather than MFU): it is what a run's
    throughput can be compared with when checkpointing trades compute for memory.
    """
    forward = forward_flops(net, frames, height, width, text_tokens)
    if recompute is None:
        recompute = bool(getattr(net, "grad_checkpointing", False))
    if not recompute:
        return 3 * forward
    t, h, w = patch_grid(net, frames, height, width)
    return 3 * forward + recomputed_flops(net, t, h * w, text_tokens)
