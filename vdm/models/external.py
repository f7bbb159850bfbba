"""Public image checkpoints in vdm's layout: one table per format, from their tensor names to vdm's.

A format is data: the rules that name, for each vdm tensor, the tensors it is made of and how (`copy`, `concat`
along the first axis, `add_time_axis` for a 2-D patch kernel), and the SpaceTimeDiT arguments that make vdm's
network compute what theirs does. Another layout (DiT, SD3-style) is one more table. Conversion is strict both
ways: every vdm tensor must be made and every tensor of theirs used, so a checkpoint with parts vdm cannot
reproduce (PixArt's 1024-MS size conditions) is refused, naming them, rather than imported half.

Only safetensors are read (a diffusers folder's `diffusion_pytorch_model.safetensors`, sharded or not, or a
single file), never a pickle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

SAFETENSORS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass(frozen=True)
class Rule:
    """vdm's `target` made of their `sources` by `op`; "{i}" in a name is a block's index."""

    target: str
    sources: tuple[str, ...]
    op: str = "copy"  # copy | concat | add_time_axis


OPS: dict[str, Callable[[list[Tensor]], Tensor]] = {
    "copy": lambda ts: ts[0],
    "concat": lambda ts: torch.cat(ts, dim=0),  # separate k and v projections -> vdm's fused to_kv
    "add_time_axis": lambda ts: ts[0].unsqueeze(2),  # (D, C, ph, pw) -> (D, C, 1, ph, pw): a one-frame patch
}


@dataclass(frozen=True)
class WeightFormat:
    name: str
    block_prefix: str  # their blocks are `<block_prefix><i>.`
    rules: tuple[Rule, ...]  # global rules, then the rules of block {i}
    arguments: Callable[[dict[str, Tensor], dict], dict]  # (their tensors, their config) -> SpaceTimeDiT arguments


def _attention(vdm: str, theirs: str) -> tuple[Rule, ...]:
    return tuple(
        rule
        for kind in ("weight", "bias")
        for rule in (
            Rule(f"blocks.{{i}}.{vdm}.to_q.{kind}", (f"transformer_blocks.{{i}}.{theirs}.to_q.{kind}",)),
            Rule(
                f"blocks.{{i}}.{vdm}.to_kv.{kind}",
                (f"transformer_blocks.{{i}}.{theirs}.to_k.{kind}", f"transformer_blocks.{{i}}.{theirs}.to_v.{kind}"),
                "concat",
            ),
            Rule(f"blocks.{{i}}.{vdm}.proj.{kind}", (f"transformer_blocks.{{i}}.{theirs}.to_out.0.{kind}",)),
        )
    )


def _linear(vdm: str, theirs: str) -> tuple[Rule, ...]:
    return tuple(Rule(f"{vdm}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias"))


def pixart_arguments(tensors: dict[str, Tensor], config: dict) -> dict:
    """SpaceTimeDiT arguments of a diffusers PixArtTransformer2DModel: widths from the tensors, the rest from its
    config.json (heads and sample_size are not in the shapes), checked against each other."""
    kernel = tensors["pos_embed.proj.weight"]  # (D, C, p, p)
    width, in_channels, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    depth = count_blocks(tensors, "transformer_blocks.")
    out_channels = tensors["proj_out.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"pixart: {out_channels} output channels for {in_channels} input channels (neither 1x nor 2x)")
    for key, expected in {
        "norm_type": "ada_norm_single",
        "activation_fn": "gelu-approximate",
        "attention_type": "default",
        "norm_elementwise_affine": False,
        "attention_bias": True,
    }.items():
        if config.get(key, expected) != expected:
            raise ValueError(f"pixart: config {key}={config[key]!r} is not supported (vdm reproduces {expected!r})")
    if config.get("norm_eps", 1e-6) != 1e-6:
        raise ValueError(f"pixart: norm_eps={config['norm_eps']} is not supported (vdm's norms use 1e-6)")
    missing = [key for key in ("num_attention_heads", "sample_size") if config.get(key) is None]
    if missing:
        raise ValueError(f"pixart: the config must give {missing} (they are not in the tensors' shapes)")
    heads, sample_size = int(config["num_attention_heads"]), int(config["sample_size"])
    if "attention_head_dim" in config and heads * int(config["attention_head_dim"]) != width:
        raise ValueError(f"pixart: {heads} heads x {config['attention_head_dim']} != width {width}")
    scale = config.get("interpolation_scale")
    scale = max(sample_size // 64, 1) if scale is None else scale  # diffusers' default
    cross = tensors["transformer_blocks.0.attn2.to_k.weight"].shape[1]
    if cross != width:
        raise ValueError(f"pixart: cross-attention reads {cross}-wide text, not the model width {width}")
    return {
        "in_channels": int(in_channels),
        "text_dim": int(tensors["caption_projection.linear_1.weight"].shape[1]),
        "width": int(width),
        "depth": depth,
        "heads": heads,
        "patch_size": [1, int(patch), int(patch)],
        "mlp_ratio": tensors["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / width,
        "temporal": False,
        "qk_norm": False,
        "pooled_text": False,
        "cross_modulation": False,
        "final_modulation": "table",
        "learned_sigma": out_channels == 2 * in_channels,
        "pos_embed_base_size": sample_size // int(patch),
        "pos_embed_interpolation_scale": float(scale),
        "max_size": max(512, sample_size * 4),
    }


PIXART = WeightFormat(
    name="pixart",
    block_prefix="transformer_blocks.",
    rules=(
        Rule("patch_embed.proj.weight", ("pos_embed.proj.weight",), "add_time_axis"),
        Rule("patch_embed.proj.bias", ("pos_embed.proj.bias",)),
        *_linear("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
        *_linear("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
        *_linear("modulation.1", "adaln_single.linear"),  # rows (shift, scale, gate) x (attention, MLP), as vdm's
        *_linear("caption_proj.0", "caption_projection.linear_1"),
        *_linear("caption_proj.2", "caption_projection.linear_2"),
        Rule("final.scale_shift_table", ("scale_shift_table",)),
        *_linear("final.linear", "proj_out"),
        Rule("blocks.{i}.modulation", ("transformer_blocks.{i}.scale_shift_table",)),
        *_attention("spatial_attn", "attn1"),
        *_attention("cross_attn", "attn2"),
        *_linear("blocks.{i}.mlp.0", "transformer_blocks.{i}.ff.net.0.proj"),
        *_linear("blocks.{i}.mlp.2", "transformer_blocks.{i}.ff.net.2"),
    ),
    arguments=pixart_arguments,
)

FORMATS = {f.name: f for f in (PIXART,)}


def count_blocks(tensors: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for name in tensors if (m := re.match(re.escape(prefix) + r"(\d+)\.", name))}
    if found != set(range(len(found))):
        raise ValueError(f"blocks {sorted(found)} are not numbered 0..{len(found) - 1}")
    return len(found)


def convert(fmt: WeightFormat, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Their tensors -> vdm's state dict, by the format's rules; every tensor of theirs must be used."""
    depth = count_blocks(tensors, fmt.block_prefix)
    out, used = {}, set()
    for rule in fmt.rules:
        for i in range(depth) if "{i}" in rule.target else (None,):
            names = [source.format(i=i) for source in rule.sources]
            absent = [name for name in names if name not in tensors]
            if absent:
                raise ValueError(f"{fmt.name}: the checkpoint lacks {absent} (for vdm's {rule.target.format(i=i)})")
            out[rule.target.format(i=i)] = OPS[rule.op]([tensors[name] for name in names]).contiguous()
            used.update(names)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(
            f"{fmt.name}: {len(unused)} tensors have no place in vdm's model, so it would not compute what the "
            f"checkpoint does: {unused[:8]} (size conditions of 1024-MS checkpoints are not supported)"
        )
    return out


def read_diffusers(src: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, config) of a diffusers model folder (config.json and safetensors, one file or shards) or of a
    single .safetensors file (its config.json beside it, when there is one)."""
    src = Path(src)
    if src.is_dir():
        config_path = src / "config.json"
        if (src / SHARD_INDEX).is_file():
            files = sorted(set(json.loads((src / SHARD_INDEX).read_text())["weight_map"].values()))
            paths = [src / name for name in files]
        elif (src / SAFETENSORS).is_file():
            paths = [src / SAFETENSORS]
        else:
            pickled = sorted(p.name for p in src.glob("*.bin"))
            hint = f" ({pickled} are pickles, never read here: convert them to safetensors)" if pickled else ""
            raise ValueError(f"{src}: no {SAFETENSORS} or {SHARD_INDEX}{hint}")
    elif src.suffix == ".safetensors" and src.is_file():
        config_path, paths = src.with_name("config.json"), [src]
    else:
        raise ValueError(f"{src}: not a diffusers model folder or a .safetensors file")
    tensors = {}
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return tensors, config


def import_weights(fmt: str, src: str | Path, config_overrides: dict | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(SpaceTimeDiT arguments, vdm state dict) of a public checkpoint in format `fmt`; `config_overrides` fill
    or replace entries of its config.json (e.g. heads and sample size for a file that has none beside it)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)} (got {fmt!r})")
    tensors, config = read_diffusers(src)
    config = {**config, **(config_overrides or {})}
    weights_format = FORMATS[fmt]
    return weights_format.arguments(tensors, config), convert(weights_format, tensors)
