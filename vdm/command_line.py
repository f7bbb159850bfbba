"""Hydra's side of vdm: the command line checked before Hydra reads it, the run's name in a multirun, the config
composed as train.py composes it, and its sections built into parts.

Hydra reports an unknown key with its own message and exit status 1; vdm promises `config error: <key>: ...`
and status 2 for every bad config, so train.py composes the command line here first. Hydra lives in train.py,
conf/ and this module only; the scripts that build what train.py builds (sample, bench_train) come here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from vdm.config_check import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def run_name(name: str) -> str:
    """The run's name: `name`, and in a Hydra multirun (-m) each job's own, `<name>-<job number>-<its overrides>`.

    The default name is a timestamp, so two jobs of a sweep started within one second would share a run directory
    (and resume=auto would continue the other job's run); the overrides say which job ran what.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return name
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_config = HydraConfig.get()
    parser = OverridesParser.create()
    swept = {
        o.key_or_group for o in parser.parse_overrides(command_line_overrides(sys.argv[1:])[0]) if o.is_sweep_override()
    }
    values = [
        o.input_line for o in parser.parse_overrides(list(hydra_config.overrides.task)) if o.key_or_group in swept
    ]
    label = re.sub(r"[^\w.,=+-]", "_", ",".join(values))[:150]  # a path component: no "/" or spaces
    return f"{name}-{hydra_config.job.num}" + (f"-{label}" if label else "")


# Hydra's own flags that take a value, and those that do not (python train.py --help lists them)
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
HYDRA_FLAGS_WITH_VALUE |= {"--config-dir", "-cd", "--experimental-rerun"}


def command_line_overrides(argv: list[str]) -> tuple[list[str], str]:
    """(the config overrides of a command line, without Hydra's own flags and hydra.* keys; the config name)."""
    overrides, config_name, skip = [], "config", False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--config-name", "-cn") and index + 1 < len(argv):
            config_name = argv[index + 1]
        if arg.split("=")[0] in HYDRA_FLAGS_WITH_VALUE:
            skip = "=" not in arg
            continue
        if not arg.startswith("-") and not arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra")):
            overrides.append(arg)
    return overrides, config_name


def check_command_line(argv: list[str]) -> None:
    """Compose the config from the command line's overrides the way Hydra will, before Hydra does.

    Hydra reports an unknown key or option with its own message and exit status 1; vdm promises
    `config error: <key>: ...` and status 2 for every bad config, so the composition is tried here first.
    A sweep (`a=1,2`) is tried with its first value.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides, config_name = command_line_overrides(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ConfigError(f"command line: {error}") from error
    multirun = "-m" in argv or "--multirun" in argv
    for override in parsed:
        if override.is_sweep_override() and not multirun:
            raise ConfigError(f"{override.input_line}: several values are a sweep, which needs -m (--multirun)")
    prefixes = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~", "CHANGE": ""}
    first_values = [
        f"{prefixes[o.type.name]}{o.key_or_group}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        try:
            compose(config_name, overrides=first_values)
        except HydraException as error:
            message = str(error).split("\nConfig search path")[0].strip()
            if match := re.match(r"Could not override '([^']+)'", message):
                key = match.group(1)
                raise ConfigError(f"{key}: no such key (a new key needs +{key}=...)") from error
            raise ConfigError(" ".join(line.strip() for line in message.splitlines() if line.strip())) from error


def compose_config(overrides: list[str] = (), config_name: str = "config") -> dict:
    """conf/<config_name>.yaml with the overrides, composed as `python train.py` composes it, as plain values."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def build(config: dict, section: str, **supplied):
    """Instantiate one config section; any error is re-raised as a ConfigError naming the section."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(config[section], **supplied, _convert_="all")
    except InstantiationException as error:  # Hydra wraps what the constructor raised: name the section
        cause = error.__cause__ or error
        raise ConfigError(f"{section}: {cause}") from cause
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise ConfigError(f"{section}: {error}") from error


def build_network(config: dict) -> tuple:
    """(text encoder, autoencoder, network), the network's initialization a function of config["seed"].

    The network's in_channels and text_dim are what the autoencoder and text encoder supply; they are recorded
    in config["model"], so the run's config.yaml states them and export and sample check weights against them.
    """
    import torch

    torch.manual_seed(config["seed"])
    text_encoder = build(config, "text")
    autoencoder = build(config, "autoencoder")
    widths = {"in_channels": autoencoder.latent_channels, "text_dim": text_encoder.dim}
    net = build(config, "model", **widths)
    config["model"].update(widths)
    return text_encoder, autoencoder, net
