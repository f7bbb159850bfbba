"""Train a text-to-video diffusion model: `python train.py [group=option] [key=value ...]`.

Compose the Hydra config, check it, build every part from it, then fit. Nothing trains until the
whole config has been checked and built; a bad key or value stops here with its full name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from vdm.command_line import build, build_network, check_command_line, run_name
from vdm.config_check import ConfigError, check_config
from vdm.init_from import init_from
from vdm.run_checks import check_parts, check_run_keys
from vdm.training.checkpointing import CheckpointWriteError
from vdm.training.nonfinite import NonFiniteTraining
from vdm.training.preemption import StopRequests
from vdm.training.run import Parts, fit

SECTIONS = (
    "text",
    "autoencoder",
    "model",
    "diffusion",
    "data",
    "optim",
    "trainer",
    "logger",
    "sampling",
    "strategy",
    "ema",
    "evaluation",
)
EXIT_CONFIG, EXIT_NONFINITE, EXIT_CHECKPOINT_WRITE = 2, 3, 4


def main(cfg: DictConfig) -> dict:
    # first: from here on a stop signal (Slurm's SIGUSR1 or SIGTERM) is recorded, and acted on at the first step
    stop_requests = StopRequests()
    stop_requests.listen()
    parts = assemble(cfg)
    summary = fit(parts, run_name(parts.config["name"]), Path(parts.config["run_root"]), stop_requests)
    summary.log()
    return summary.as_dict()


def assemble(cfg: DictConfig) -> Parts:
    """Check the config and build every part from it; a ConfigError names the first bad key."""
    config = OmegaConf.to_container(cfg, resolve=True)
    check_run_keys(config)
    check_config({k: config[k] for k in SECTIONS}, supplied={"model": {"in_channels", "text_dim"}})

    text_encoder, autoencoder, net = build_network(config)
    inflation = init_from(net, config) if config["init_from"] is not None else None
    parts = Parts(config, text_encoder, autoencoder, net, *(build(config, section) for section in SECTIONS[3:]))
    parts.inflation = inflation
    check_parts(parts)
    return parts


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def cli(cfg: DictConfig) -> None:
    try:
        main(cfg)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except NonFiniteTraining as error:
        print(f"non-finite training: {error}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except CheckpointWriteError as error:
        print(f"checkpoint write failed: {error}", file=sys.stderr)
        sys.exit(EXIT_CHECKPOINT_WRITE)


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    cli()
