"""SpaceTimeDiT: a diffusion transformer over video latents with factorized space-time blocks.

Shape legend (see vdm/types.py): B batch, C channels, T frames, H height, W width, L text tokens,
Dt text width, D model width; after patching t frames, h x w patches, s = h * w tokens per frame.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vdm.models.attention import check_backends, parse_backends
from vdm.models.blocks import SpaceTimeBlock, modulate
from vdm.models.embeddings import PatchEmbed3d, TimestepEmbedding, sincos_2d
from vdm.types import TextCond


def _check_positive_int(name: str, value: object) -> None:
    # bool is an int subclass; True as a width is always a mistake
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int ({name}={value!r})")


class FinalLayer(nn.Module):
    """Norm, shift/scale from the conditioning vector, then project tokens back to patches.

    modulation "linear" (DiT): shift and scale are a linear map of SiLU(c). "table" (PixArt): they are a
    learned (2, D) table plus c itself.
    """

    def __init__(self, width: int, out_dim: int, modulation: str = "linear"):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.table = modulation == "table"
        if self.table:
            self.scale_shift_table = nn.Parameter(torch.zeros(2, width))  # rows: shift, scale
        else:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x (B, t, s, D), c (B, D) -> (B, t, s, out_dim)
        if self.table:
            shift, scale = rearrange(self.scale_shift_table, "two d -> two 1 1 1 d") + rearrange(c, "b d -> b 1 1 d")
        else:
            shift, scale = rearrange(self.modulation(c), "b (two d) -> two b 1 1 d", two=2)
        return self.linear(modulate(self.norm(x), shift, scale))


class SpaceTimeDiT(nn.Module):
    """Predicts a (B, C, T, H, W) target from a noisy latent clip, a time t in [0, 1] and a caption.

    An image is a clip with T = 1. With temporal=False the blocks have no temporal branch, and the
    same weights load by name into a temporal=True model whose new layers start silent.

    Speed and memory switches, none of which changes what the network computes:
    grad_checkpointing recomputes activations in the backward pass: of every `grad_checkpointing_every`-th
    block (0, k, 2k, ...), the whole block (`grad_checkpointing_scope="block"`) or only its three attention
    branches ("attention": their activations grow with the sequence; the MLP's are kept).
    compile_blocks compiles each SpaceTimeBlock with torch.compile, in place (regional compilation: one
    block's graph is compiled once and reused by all, the parameter names stay, and the strategies wrap the
    compiled blocks as they wrap the others; activation checkpointing recomputes the compiled block).
    attention_backend restricts scaled_dot_product_attention to SDPA kernels (flash, cudnn, efficient,
    math, or a list of them); `check_attention_backend` says at start whether they can run.

    Options that exist so that public image checkpoints load exactly (PixArt-alpha/Sigma in diffusers'
    layout, scripts/import_weights.py), each off by default: pooled_text=False (the conditioning vector is the
    time embedding alone), cross_modulation=False (cross-attention without norm or gate), final_modulation
    "table" (the output's shift/scale from a table plus the time embedding), pos_embed_base_size and
    pos_embed_interpolation_scale (diffusers' sin/cos grid), learned_sigma (the output layer also predicts a
    variance, as PixArt's does; forward returns only the prediction, so the variance rows get no gradient and
    vdm's objectives never read them: they are kept so the weights stay the checkpoint's).
    """

    # Distributed strategies wrap this class from outside (FSDP auto-wrap, activation checkpointing).
    block_class = SpaceTimeBlock

    def __init__(
        self,
        *,
        in_channels: int,
        text_dim: int,
        width: int,
        depth: int,
        heads: int,
        patch_size: tuple[int, int, int] | list[int] = (1, 2, 2),
        mlp_ratio: float = 4.0,
        temporal: bool = True,
        qk_norm: bool = True,
        max_frames: int = 64,
        max_size: int = 512,
        grad_checkpointing: bool = False,
        grad_checkpointing_every: int = 1,
        grad_checkpointing_scope: str = "block",
        compile_blocks: bool = False,
        attention_backend: str | list[str] | None = None,
        pooled_text: bool = True,
        cross_modulation: bool = True,
        final_modulation: str = "linear",
        learned_sigma: bool = False,
        pos_embed_base_size: int | None = None,
        pos_embed_interpolation_scale: float = 1.0,
    ):
        super().__init__()
        for name, value in [
            ("in_channels", in_channels),
            ("text_dim", text_dim),
            ("width", width),
            ("depth", depth),
            ("heads", heads),
            ("max_frames", max_frames),
            ("max_size", max_size),
            ("grad_checkpointing_every", grad_checkpointing_every),
        ]:
            _check_positive_int(name, value)
        patch_size = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else patch_size
        if (
            not isinstance(patch_size, tuple)
            or len(patch_size) != 3
            or any(not isinstance(p, int) or isinstance(p, bool) or p <= 0 for p in patch_size)
        ):
            raise ValueError(f"patch_size must be 3 positive ints (pt, ph, pw) (patch_size={patch_size!r})")
        if grad_checkpointing_scope not in ("block", "attention"):
            raise ValueError(f"grad_checkpointing_scope must be block or attention (got {grad_checkpointing_scope!r})")
        for name, value in [
            ("compile_blocks", compile_blocks),
            ("pooled_text", pooled_text),
            ("cross_modulation", cross_modulation),
            ("learned_sigma", learned_sigma),
        ]:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false (got {value!r})")
        if final_modulation not in ("linear", "table"):
            raise ValueError(f"final_modulation must be linear or table (got {final_modulation!r})")
        if pos_embed_base_size is not None:
            _check_positive_int("pos_embed_base_size", pos_embed_base_size)
        if not isinstance(pos_embed_interpolation_scale, (int, float)) or not pos_embed_interpolation_scale > 0:
            raise ValueError(
                f"pos_embed_interpolation_scale must be a positive number (got {pos_embed_interpolation_scale!r})"
            )
        backends = parse_backends(attention_backend)
        if width % heads != 0:
            raise ValueError(f"width must be divisible by heads (width={width}, heads={heads})")
        if width % 4 != 0:
            raise ValueError(f"width must be divisible by 4 for the 2-D sin/cos position encoding (width={width})")
        if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or int(width * mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio must be a positive number (mlp_ratio={mlp_ratio!r})")

        self.in_channels = in_channels
        self.text_dim = text_dim
        self.width = width
        self.patch_size = patch_size
        self.temporal = temporal
        self.max_frames = max_frames
        self.max_size = max_size
        self.heads = heads
        self.grad_checkpointing = grad_checkpointing
        self.grad_checkpointing_every = grad_checkpointing_every
        self.grad_checkpointing_scope = grad_checkpointing_scope
        self.attention_backends = backends
        self.pooled_text = pooled_text
        self.learned_sigma = learned_sigma
        self.pos_embed_base_size = pos_embed_base_size
        self.pos_embed_interpolation_scale = float(pos_embed_interpolation_scale)

        pt, ph, pw = patch_size
        self.patch_embed = PatchEmbed3d(in_channels, width, patch_size)
        self.t_embedder = TimestepEmbedding(width)
        if pooled_text:
            self.pooled_proj = nn.Sequential(nn.Linear(text_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.caption_proj = nn.Sequential(
            nn.Linear(text_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width)
        )
        # adaLN-single: one modulation vector per sample, shared by all blocks (each adds its own table)
        rows = SpaceTimeBlock.modulation_rows(cross_modulation)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, rows * width))
        if temporal:
            self.temporal_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(
                width,
                heads,
                mlp_ratio=mlp_ratio,
                temporal=temporal,
                qk_norm=qk_norm,
                attention_backends=backends,
                cross_modulation=cross_modulation,
            )
            for _ in range(depth)
        )
        self.out_channels = 2 * in_channels if learned_sigma else in_channels
        self.final = FinalLayer(width, pt * ph * pw * self.out_channels, modulation=final_modulation)
        self.sequence_parallel = None  # set_sequence_parallel: None, or this rank's FrameSplit
        self.initialize_weights()
        self.set_grad_checkpointing(grad_checkpointing)
        if compile_blocks:
            for block in self.blocks:
                block.compile()  # in place: the module, its parameters and their names stay

    def initialize_weights(self) -> None:
        """Set every parameter. Safe to call again, e.g. after `to_empty()` on a meta-built model."""

        def base_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()

        self.apply(base_init)

        # Patch embedding is a linear map of the flattened patch (DiT).
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(rearrange(w, "d c pt ph pw -> d (c pt ph pw)"))
        nn.init.zeros_(self.patch_embed.proj.bias)

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero modulation: every gate is 0, so each block starts as the identity, and temporal layers
        # added to a trained image model start silent (the inflated model equals the image model).
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)
        if self.temporal:
            nn.init.zeros_(self.temporal_modulation[-1].weight)
            nn.init.zeros_(self.temporal_modulation[-1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
            if block.enable_temporal:
                nn.init.zeros_(block.temporal_modulation)

        # Zero output layer: the untrained model predicts 0 (DiT).
        if self.final.table:
            nn.init.zeros_(self.final.scale_shift_table)
        else:
            nn.init.zeros_(self.final.modulation[-1].weight)
            nn.init.zeros_(self.final.modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled
        for index, block in enumerate(self.blocks):
            block.checkpoint_attention = (
                enabled and self.grad_checkpointing_scope == "attention" and (self.checkpointed(index))
            )

    def set_sequence_parallel(self, split) -> None:
        """Split each clip's frames over a group of ranks (vdm/distributed/sequence.py builds `split`; None: off).

        The input and output stay whole clips, the same on every rank of the group: forward keeps this rank's
        frames after checking the sizes, runs the blocks on them (only the temporal attention communicates) and
        gathers the output's frames, so callers (objectives, samplers) see the unsplit network. The heads must
        divide over the group; the patch frames are checked at each call."""
        if split is not None and self.temporal:
            split.check("heads", self.heads)
        self.sequence_parallel = split
        for block in self.blocks:
            block.sequence_parallel = split

    def checkpointed(self, index: int) -> bool:
        """Whether block `index` is recomputed (whole, or its attention) when grad_checkpointing is on."""
        return index % self.grad_checkpointing_every == 0

    def check_attention_backend(self, device: torch.device, dtype: torch.dtype) -> None:
        """ValueError now if attention_backend cannot run on `device` in `dtype`, rather than at the first step."""
        try:
            check_backends(self.attention_backends, self.heads, self.width // self.heads, device, dtype)
        except ValueError as error:
            raise ValueError(f"attention_backend: {error}") from None

    def _check_input(self, x: Tensor, t: Tensor, cond: TextCond) -> None:
        if x.ndim != 5:
            raise ValueError(f"x must be (B, C, T, H, W), got shape {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"x has {C} channels but in_channels={self.in_channels}")
        if T > self.max_frames:
            raise ValueError(f"x has T={T} frames, more than max_frames={self.max_frames}")
        if H > self.max_size or W > self.max_size:
            raise ValueError(f"x has (H, W)=({H}, {W}), larger than max_size={self.max_size}")
        pt, ph, pw = self.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"x (T, H, W)=({T}, {H}, {W}) is not divisible by patch_size={self.patch_size}")
        if t.shape != (B,):
            raise ValueError(f"t must have shape (B,)=({B},), got {tuple(t.shape)}")
        if cond.tokens.shape[0] != B or cond.tokens.shape[-1] != self.text_dim:
            raise ValueError(
                f"cond.tokens must be (B={B}, L, text_dim={self.text_dim}), got {tuple(cond.tokens.shape)}"
            )

    def forward(self, x: Tensor, t: Tensor, cond: TextCond) -> Tensor:
        # x (B, C, T, H, W), t (B,) in [0, 1] -> (B, C, T, H, W) in x's dtype
        self._check_input(x, t, cond)
        param_dtype = self.patch_embed.proj.weight.dtype
        split = self.sequence_parallel
        if split is not None:  # this rank's frames (set_sequence_parallel): whole patches of pt latent frames each
            x_all = x
            x = split.local_frames(x, dim=2, frames=x.shape[2] // self.patch_size[0])
        tokens, (nt, nh, nw) = self.patch_embed(x.to(param_dtype))  # (B, t, s, D)
        # the same spatial positions in every frame, so an image model and its video inflation agree
        positions = sincos_2d(
            nh,
            nw,
            self.width,
            device=x.device,
            base_size=self.pos_embed_base_size,
            interpolation_scale=self.pos_embed_interpolation_scale,
        )
        tokens = tokens + positions.to(tokens.dtype)

        c = self.t_embedder(t)  # (B, D)
        if self.pooled_text:
            c = c + self.pooled_proj(cond.pooled.to(param_dtype))
        context = self.caption_proj(cond.tokens.to(param_dtype))  # (B, L, D)
        modulation = rearrange(self.modulation(c), "b (n d) -> b n d", d=self.width)  # (B, 9 or 6, D)
        temporal_modulation = (
            rearrange(self.temporal_modulation(c), "b (n d) -> b n d", n=3) if self.temporal else None
        )  # (B, 3, D)

        use_checkpoint = (
            self.grad_checkpointing
            and self.grad_checkpointing_scope == "block"
            and self.training
            and torch.is_grad_enabled()
        )
        for index, block in enumerate(self.blocks):
            args = (tokens, context, cond.mask, modulation, temporal_modulation)
            if use_checkpoint and self.checkpointed(index):
                tokens = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)

        out = self.final(tokens, c)  # (B, t, s, pt*ph*pw*out_channels)
        if split is not None:  # every rank's frames, in order: the whole clip's output
            out, x = split.gather_frames(out, dim=1), x_all
        pt, ph, pw = self.patch_size
        out = rearrange(
            out,
            "b t (h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            h=nh,
            w=nw,
            pt=pt,
            ph=ph,
            pw=pw,
        )
        if self.learned_sigma:
            out = out[:, : self.in_channels]  # the prediction; the variance half is not used (class docstring)
        return out.to(x.dtype)
