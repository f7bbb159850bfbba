"""Start a run's network from a weights file (`init_from`): fine-tuning, or an image model into a video model."""

from __future__ import annotations

import logging

from torch import nn

from vdm.config_check import ConfigError
from vdm.models.weights import load_into

log = logging.getLogger("vdm")


def init_from(net: nn.Module, config: dict) -> None:
    """Load `config["init_from"]` into the freshly built network, as `init_strict` and `init_ema` say.

    This happens before any strategy wraps the network, so every rank starts from the same weights; a resumed
    run then overwrites them with its checkpoint's.
    """
    path, strict, ema = str(config["init_from"]), config["init_strict"], config["init_ema"]
    try:
        report = load_into(net, path, ema=ema, strict=strict)
    except (ValueError, FileNotFoundError) as error:
        hint = " (init_strict=false loads only the matching names)" if strict and "strict" in str(error) else ""
        raise ConfigError(f"init_from: {error}{hint}") from error
    if report.config.get("heads") != config["model"]["heads"]:  # invisible in the shapes when qk_norm is off
        raise ConfigError(
            f"init_from: {path} was trained with heads={report.config.get('heads')}, "
            f"model.heads is {config['model']['heads']}"
        )
    log.info("init_from %s%s: %s", path, " (EMA weights)" if ema else "", report)
    if report.missing:
        log.warning(
            "init_from: %d network tensors are not in the file and keep their initialization: %s",
            len(report.missing),
            report.missing,
        )
    if report.unexpected:
        log.warning(
            "init_from: %d tensors of the file have no place in the network and are ignored: %s",
            len(report.unexpected),
            report.unexpected,
        )
