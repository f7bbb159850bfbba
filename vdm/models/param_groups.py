"""The network's parameters by kind, for staged fine-tuning: which ones train, and at which learning rate.

temporal: the layers an image model does not have (temporal attention and its modulation);
embeddings: the patch, time and caption embeddings; spatial: everything else (spatial attention,
cross-attention, MLPs, the modulation tables and the output layer), what an image model learned.
"""

from __future__ import annotations

from torch import nn

GROUPS = ("temporal", "spatial", "embeddings")
TRAINABLE = ("all", "temporal")
EMBEDDINGS = ("patch_embed.", "t_embedder.", "pooled_proj.", "caption_proj.")


def is_temporal(name: str) -> bool:
    """Whether a parameter belongs to a temporal layer, which an image model does not have."""
    return any(part.startswith("temporal") for part in name.split("."))


def is_lora(name: str) -> bool:
    """A LoRA adapter's own parameter (lora_A, lora_B: vdm/models/lora.py), which trains whatever else is frozen."""
    return ".lora_A." in name or ".lora_B." in name


def parameter_group(name: str) -> str:
    """temporal, spatial or embeddings (the module docstring); `name` as in net.named_parameters()."""
    if is_temporal(name):
        return "temporal"
    if name.startswith(EMBEDDINGS):
        return "embeddings"
    return "spatial"


def set_trainable(net: nn.Module, trainable: str) -> dict[str, int]:
    """Freeze what does not train: "all" trains every parameter, "temporal" only the temporal layers (the first
    stage of an image model's fine-tune into a video model). Returns {group: trainable parameter elements}.

    Done before any strategy wraps the network, so DDP reduces, ZeRO partitions and the optimizer holds state for
    the trainable parameters only. LoRA adapters always train, and the layers they adapt (`base_layer`) never do.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE} (got {trainable!r})")
    counts = dict.fromkeys(GROUPS, 0)
    for name, parameter in net.named_parameters():
        group = parameter_group(name)
        if is_lora(name) or ".base_layer." in name:
            parameter.requires_grad_(is_lora(name))
        else:
            parameter.requires_grad_(trainable == "all" or group == "temporal")
        if parameter.requires_grad:
            counts[group] += parameter.numel()
    if trainable == "temporal" and not counts["temporal"]:
        raise ValueError("trainable=temporal: the network has no temporal layers (model.temporal=false)")
    return counts
