"""LoRA adapters (Hu et al. 2021) on the image model's layers, with the `peft` library, and their weights merged
back or written alone in peft's layout.

`add_lora` injects peft's LoRA layers into the spatial attention and MLP (or other targets) of a SpaceTimeDiT in
place: each adapted linear keeps its weight as `<layer>.base_layer.weight` (frozen) and learns
`<layer>.lora_A.default.weight` (r x in) and `<layer>.lora_B.default.weight` (out x r, zero at the start, so the
adapted network computes what it did). Each adapted layer also holds its scale alpha / r as a buffer
(`<layer>.lora_scale`), so any checkpoint of it, in any layout, says how to merge it without its config.

`merged` turns such a state dict into the plain network's (W + scale * B A under the layer's own name): what
export, sampling and init_from read. `adapter_files` writes the adapters alone as peft saves them
(adapter_model.safetensors with `base_model.model.<layer>.lora_A.weight` keys, and adapter_config.json).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vdm.models.param_groups import is_lora

TARGETS = {  # the linears LoRA may adapt, by their names in SpaceTimeBlock
    "spatial_attn": r"spatial_attn\.(to_q|to_kv|proj)",
    "cross_attn": r"cross_attn\.(to_q|to_kv|proj)",
    "temporal_attn": r"temporal_attn\.(to_q|to_kv|proj)",
    "mlp": r"mlp\.(0|2)",
}

SCALE = "lora_scale"
BASE, A, B = ".base_layer.weight", ".lora_A.default.weight", ".lora_B.default.weight"


def target_pattern(targets: list[str]) -> str:
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"lora_targets must be a non-empty list of {sorted(TARGETS)} (got {targets!r})")
    return r"blocks\.\d+\.(" + "|".join(TARGETS[t] for t in targets) + ")"


def add_lora(net: nn.Module, rank: int, alpha: float | None, targets: list[str]) -> list[str]:
    """Inject LoRA adapters of rank `rank` (scale alpha / rank; alpha None: 1) into `net` in place; returns the
    adapted layers' names. The base weights are frozen; the adapters start at B = 0, so `net` is unchanged."""
    from peft import LoraConfig, inject_adapter_in_model  # here: the rest of this module serves export without peft

    alpha = float(rank if alpha is None else alpha)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_pattern(targets), lora_dropout=0.0)
    inject_adapter_in_model(config, net)
    adapted = []
    for name, module in net.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            module.base_layer.requires_grad_(False)
            module.register_buffer(SCALE, torch.tensor(alpha / rank))
            adapted.append(name)
    return adapted


def adapted_layers(state: dict[str, Tensor]) -> list[str]:
    return sorted(name[: -len(BASE)] for name in state if name.endswith(BASE))


def merged(state: dict[str, Tensor], scales: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A state dict with LoRA layers -> the plain network's: each adapted weight becomes W + scale * B A (in
    float32, then the weight's dtype), its bias moves back to `<layer>.bias`, the adapters and scales go.
    `scales` ({`<layer>.lora_scale`: value}) serve a state dict without buffers, such as the EMA's."""
    layers = adapted_layers(state)
    if not layers:
        return dict(state)
    lookup = {**(scales or {}), **state}
    out = {}
    for name, value in state.items():
        if is_lora(name) or name.endswith("." + SCALE):
            continue
        layer = next((p for p in layers if name.startswith(p + ".base_layer.")), None)
        if layer is None:
            out[name] = value
            continue
        plain = layer + name[len(layer) + len(".base_layer") :]
        if name.endswith(BASE):
            delta = lookup[layer + "." + SCALE].float() * (state[layer + B].float() @ state[layer + A].float())
            value = (value.float() + delta).to(value.dtype)
        out[plain] = value
    return out


def lora_scales(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.endswith("." + SCALE)}


def adapter_files(state: dict[str, Tensor], out: str | Path) -> Path:
    """Write the LoRA adapters of `state` alone, as peft's `save_pretrained` does: `out/adapter_model.safetensors`
    and `out/adapter_config.json` (rank, alpha, the adapted modules), which peft loads into the plain network."""
    layers = adapted_layers(state)
    if not layers:
        raise ValueError("the weights hold no LoRA adapters (the run had optim.lora_rank=0)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank = state[layers[0] + A].shape[0]
    scales = {float(state[layer + "." + SCALE]) for layer in layers}
    if len(scales) != 1:
        raise ValueError(f"the adapters have different scales {sorted(scales)}: not one peft config")
    tensors = {}
    for layer in layers:
        for kind, key in (("lora_A", A), ("lora_B", B)):
            tensors[f"base_model.model.{layer}.{kind}.weight"] = state[layer + key].detach().contiguous().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": int(rank),
        "lora_alpha": scales.pop() * int(rank),
        "target_modules": "(" + "|".join(re.escape(layer) for layer in layers) + ")",  # peft: a full match
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out
