"""Start a run's network from trained weights (`init_from`): fine-tuning, or an image model into a video model.

`init_from` is a weights file (.safetensors, scripts/export.py) or a training checkpoint in any layout
(vdm/checkpoints.py reads it, with its run's config.yaml). Weights of a video model, or of an image model into an
image model, load by name (`init_strict`). Weights of an image model (temporal=false) into a video model are an
inflation (vdm/models/inflate.py): the run refuses to start unless the video model, on a random clip, equals the
image model on each frame (`init_parity_check`, on by default), and the run directory gets `inflation.json`,
what became of every tensor and what the check measured.
"""

from __future__ import annotations

import logging

import torch

from vdm.checkpoints import CheckpointError, read_weights
from vdm.config_check import ConfigError
from vdm.models import SpaceTimeDiT
from vdm.models.inflate import inflate, parity
from vdm.models.weights import load_state_into

log = logging.getLogger("vdm")


def init_from(net: SpaceTimeDiT, config: dict) -> dict | None:
    """Load `config["init_from"]` into the freshly built network, as the `init_*` keys say; returns the
    inflation report (a dict, for the run directory) when it was an inflation, else None.

    This happens before any strategy wraps the network, so every rank starts from the same weights; a resumed
    run then overwrites them with its checkpoint's.
    """
    path, strict, ema = str(config["init_from"]), config["init_strict"], config["init_ema"]
    try:
        arguments, state_dict = read_weights(path, ema=ema)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        raise ConfigError(f"init_from: {error}") from error
    if arguments.get("heads") != config["model"]["heads"]:  # invisible in the shapes when qk_norm is off
        raise ConfigError(
            f"init_from: {path} was trained with heads={arguments.get('heads')}, "
            f"model.heads is {config['model']['heads']}"
        )
    source = f"{path}{' (EMA weights)' if ema else ''}"
    if net.temporal and not arguments.get("temporal", True):
        return inflate_from(net, arguments, state_dict, source, config)
    try:
        report = load_state_into(net, state_dict, strict=strict, source=path, config=arguments)
    except ValueError as error:
        hint = " (init_strict=false loads only the matching names)" if strict and "strict" in str(error) else ""
        raise ConfigError(f"init_from: {error}{hint}") from error
    log.info("init_from %s: %s", source, report)
    if report.missing:
        log.warning(
            "init_from: %d network tensors are not in %s and keep their initialization: %s",
            len(report.missing),
            path,
            report.missing,
        )
    if report.unexpected:
        log.warning(
            "init_from: %d tensors of %s have no place in the network and are ignored: %s",
            len(report.unexpected),
            path,
            report.unexpected,
        )
    return None


def inflate_from(net: SpaceTimeDiT, arguments: dict, state_dict: dict, source: str, config: dict) -> dict:
    """The image model's weights into the video network `net`, then the parity check (unless turned off)."""
    try:
        report = inflate(net, state_dict, strict=config["init_strict"])
    except ValueError as error:
        raise ConfigError(f"init_from: {error}") from error
    log.info("init_from %s: an image model into a video model: %s", source, report)
    if config["init_parity_check"]:
        with torch.device("meta"):
            image = SpaceTimeDiT(**{**arguments, "compile_blocks": False, "grad_checkpointing": False})
        image.load_state_dict(state_dict, strict=True, assign=True)
        report.parity = parity(image.float(), net, tolerance=config["init_parity_tolerance"], seed=config["seed"])
        found = report.parity
        if not found["passed"]:
            first = found["first_difference"]
            raise ConfigError(
                f"init_from: the inflated video model is not the image model {source}: on a random "
                f"{'x'.join(map(str, found['clip'][1:]))} clip the largest difference is {found['max_abs_diff']:.3g} "
                f"(tolerance init_parity_tolerance={found['tolerance']:g} x {found['scale']:.3g}, the largest output) "
                f"at (batch, channel, frame, row, column) {tuple(found['at'])}, "
                f"first above the tolerance at {first['stage']} ({first['max_abs_diff']:.3g}). "
                f"Created without a counterpart in the image model: {[n for n in report.created][:8]}"
            )
        log.info(
            "init_from: parity check passed: the video model equals the image model on every frame "
            "(max abs difference %.2g <= %g x %.3g, the largest output)",
            found["max_abs_diff"],
            found["tolerance"],
            found["scale"],
        )
    else:
        log.warning("init_from: init_parity_check=false: the inflated model is not checked against the image model")
    return report.as_dict()
