"""An image model into a video model (inflation), and the check that the video model still is the image model.

A SpaceTimeDiT with temporal=False is an image model. Its weights go into a temporal=True network by name:
spatial attention, cross-attention, MLPs, embeddings and modulation are copied; the temporal layers
(`temporal_attn`, the `temporal_modulation` rows and their projection) are new, and start silent because
their gates start at zero. A temporal patch size pt > 1 reshapes two tensors: the patch embedding's kernel is
repeated over pt frames and divided by pt, and the output layer's rows are repeated for each of the pt frames,
so on a clip whose frames are all the same image the video model gives the image model's output on every frame.

`parity` runs both models on one random clip (a static one when pt > 1) and finds the largest difference and
the first place it arises; an inflation that does not reproduce the image model is refused before step 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from vdm.models.dit import SpaceTimeDiT
from vdm.models.param_groups import is_temporal
from vdm.types import TextCond

PATCH_KERNEL, OUTPUT_WEIGHT, OUTPUT_BIAS = "patch_embed.proj.weight", "final.linear.weight", "final.linear.bias"


@dataclass
class InflationReport:
    """What became of every tensor: copied as it is, created (kept at the video model's initialization),
    reshaped (name, image shape, video shape) or unused (in the image model, not in the video model)."""

    copied: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    reshaped: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    parity: dict | None = None  # the parity check's result, once run

    def as_dict(self) -> dict:
        return {
            "copied": self.copied,
            "created": self.created,
            "reshaped": [{"name": n, "image": a, "video": b} for n, a, b in self.reshaped],
            "unused": self.unused,
            "parity": self.parity,
        }

    def __str__(self) -> str:
        return (
            f"{len(self.copied)} tensors copied, {len(self.created)} created "
            f"({sum(is_temporal(n) for n in self.created)} temporal), {len(self.reshaped)} reshaped "
            f"({', '.join(n for n, _, _ in self.reshaped) or 'none'}), {len(self.unused)} unused"
        )


def inflated(name: str, image: Tensor, video: Tensor) -> Tensor | None:
    """The image tensor in the video tensor's shape, for the two tensors a temporal patch size changes; else None."""
    same_patch = image.shape[:2] + image.shape[3:] == video.shape[:2] + video.shape[3:]
    if name == PATCH_KERNEL and image.ndim == 5 and image.shape[2] == 1 and same_patch:
        pt = video.shape[2]  # (D, C, 1, ph, pw) -> (D, C, pt, ph, pw): a static clip gives the image's tokens
        return repeat(image, "d c 1 ph pw -> d c pt ph pw", pt=pt) / pt
    output = name in (OUTPUT_WEIGHT, OUTPUT_BIAS) and image.shape[1:] == video.shape[1:]
    if output and video.shape[0] % image.shape[0] == 0:
        pt = video.shape[0] // image.shape[0]  # rows are (pt ph pw c): the image's rows once per output frame
        return repeat(image, "o ... -> (pt o) ...", pt=pt)
    return None


def inflate(video_net: nn.Module, image_state: dict[str, Tensor], strict: bool = True) -> InflationReport:
    """Copy an image model's weights into `video_net` in place, as the module docstring says.

    strict: every tensor of the video model that is not temporal must come from the image model (a different
    depth or width is refused here); strict=False keeps such tensors at their initialization and lists them as
    created, and the parity check is what then tells whether the video model is still the image model.
    A shape that neither matches nor inflates is always refused. Nothing is changed when an error is raised.
    """
    report, loaded = InflationReport(), {}
    target = video_net.state_dict()
    for name, video in target.items():
        if name not in image_state:
            report.created.append(name)
            continue
        image = image_state[name]
        if image.shape == video.shape:
            loaded[name] = image
            report.copied.append(name)
        elif (reshaped := inflated(name, image, video)) is not None:
            loaded[name] = reshaped
            report.reshaped.append((name, list(image.shape), list(video.shape)))
        else:
            raise ValueError(f"inflation: {name} is {list(image.shape)} in the image model, {list(video.shape)} here")
    report.unused = sorted(set(image_state) - set(target))
    not_temporal = [name for name in report.created if not is_temporal(name)]
    if strict and (not_temporal or report.unused):
        raise ValueError(
            f"inflation: the image model does not have {len(not_temporal)} of this model's non-temporal tensors "
            f"{not_temporal[:5]} and has {len(report.unused)} it does not use {report.unused[:5]}: another depth "
            "or architecture (init_strict=false loads what matches; the parity check then decides)"
        )
    video_net.load_state_dict(loaded, strict=False)
    return report


# ------------------------------------------------------------------ parity


def probe_inputs(net: SpaceTimeDiT, seed: int = 0) -> tuple[Tensor, Tensor, TextCond]:
    """One clip (1, C, T, H, W) of 2 latent frames' worth of patches (a static clip when pt > 1), 4 x 4 patches
    a frame, a time and a caption of 5 tokens, 2 of them padding, all drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    pt, ph, pw = net.patch_size
    frames = 2 * pt
    x = torch.randn(1, net.in_channels, 1 if pt > 1 else frames, 4 * ph, 4 * pw, generator=generator)
    x = x.expand(-1, -1, frames, -1, -1).contiguous()
    tokens = torch.randn(1, 5, net.text_dim, generator=generator)
    mask = torch.tensor([[True, True, True, False, False]])
    pooled = torch.randn(1, net.text_dim, generator=generator)
    return x, torch.tensor([0.37]), TextCond(tokens, mask, pooled)


@torch.no_grad()
def parity(image_net: SpaceTimeDiT, video_net: SpaceTimeDiT, tolerance: float = 1e-5, seed: int = 0) -> dict:
    """The video model on a clip against the image model on each of its frames, in float32 on the CPU.

    The tolerance is relative to the size of what is compared: a difference passes when it is at most
    `tolerance * max(1, largest magnitude)`, since the same sums taken in another batch layout round differently
    by an amount that grows with the values (the hidden states of a deep, trained model reach the hundreds).

    Returns {"max_abs_diff", "scale", "tolerance", "passed", "first_difference"}: where a difference above the
    tolerance first arises (the patch embedding, a block, or the output layer), found by comparing each stage.
    """
    image_net, video_net = image_net.float().eval(), video_net.float().eval()
    x, t, cond = probe_inputs(video_net, seed)
    frames = x.shape[2]
    pt = video_net.patch_size[0]
    depth = min(len(image_net.blocks), len(video_net.blocks))
    stages = ["patch_embed", *(f"blocks.{i}" for i in range(depth))]  # then the output layer
    seen: dict[str, dict[str, Tensor]] = {"image": {}, "video": {}}
    hooks = []
    for kind, net in (("image", image_net), ("video", video_net)):
        for stage in stages:
            module = net.get_submodule(stage)
            hooks.append(module.register_forward_hook(lambda m, i, out, k=kind, s=stage: seen[k].__setitem__(s, out)))
    try:
        with torch.compiler.set_stance("force_eager"):  # compiled blocks (compile_blocks) run as written
            video = video_net(x, t, cond)  # (1, C, T, H, W)
        # every frame as its own image: a batch of T one-frame clips, the caption repeated
        per_frame = rearrange(x[:, :, ::pt], "1 c t h w -> t c 1 h w")
        n = per_frame.shape[0]
        repeated = TextCond(cond.tokens.expand(n, -1, -1), cond.mask.expand(n, -1), cond.pooled.expand(n, -1))
        with torch.compiler.set_stance("force_eager"):
            image = image_net(per_frame, t.expand(n), repeated)  # (t, C, 1, H, W)
    finally:
        for hook in hooks:
            hook.remove()
    expected = repeat(image, "t c 1 h w -> 1 c (t pt) h w", pt=pt)
    difference = (video - expected).abs()
    largest = float(difference.max())
    scale = max(1.0, float(expected.abs().max()))
    first = None
    for stage in stages:
        image_out, video_out = seen["image"][stage], seen["video"][stage]
        image_out = image_out[0] if isinstance(image_out, tuple) else image_out  # patch_embed: (tokens, grid)
        video_out = video_out[0] if isinstance(video_out, tuple) else video_out
        as_video = rearrange(image_out, "t 1 s d -> 1 t s d")  # (B=1, t, s, D) like the video model's tokens
        stage_diff = float((video_out - as_video).abs().max())
        if stage_diff > tolerance * max(1.0, float(as_video.abs().max())):
            first = {"stage": stage, "max_abs_diff": stage_diff}
            break
    if first is None and largest > tolerance * scale:
        first = {"stage": "final", "max_abs_diff": largest}
    where = tuple(int(i) for i in torch.unravel_index(difference.argmax(), difference.shape))
    return {
        "max_abs_diff": largest,
        "at": list(where),  # (batch, channel, frame, row, column) of the largest difference
        "scale": scale,  # max(1, the largest output magnitude): the tolerance is relative to it
        "tolerance": tolerance,
        "passed": largest <= tolerance * scale,
        "first_difference": first,
        "clip": list(x.shape),
        "frames": frames,
    }
