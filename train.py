"""Train a text-to-video diffusion model: `python train.py [group=option] [key=value ...]`.

Compose the Hydra config, check it, build every part from it, then fit. Nothing trains until the
whole config has been checked and built; a bad key or value stops here with its full name.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from vdm.config_check import ConfigError, check_config
from vdm.distributed.threads import threads_per_process
from vdm.evaluation.moving_digits import prompt_set
from vdm.models.weights import load_into
from vdm.training.callbacks import (
    Checkpointing,
    CheckpointWriteError,
    HeldOutLoss,
    MetricsLog,
    SampleVideos,
    ShardingReport,
    StreamPosition,
)
from vdm.training.datamodule import VideoDataModule
from vdm.training.module import VideoDiffusion
from vdm.training.nonfinite import NonFiniteGuard, NonFiniteTraining
from vdm.training.preemption import Preemption, StopRequests
from vdm.training.quality import MovingDigitsQuality
from vdm.training.reshard import prepare_resume
from vdm.training.run_dir import CHECKPOINT, RunDir
from vdm.training.throughput import TrainMetrics

log = logging.getLogger("vdm")
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


def build(cfg: DictConfig, section: str, **supplied):
    """Instantiate one config section; any error is re-raised as a ConfigError naming the section."""
    try:
        return hydra.utils.instantiate(cfg[section], **supplied, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise ConfigError(f"{section}: {cause}") from cause
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise ConfigError(f"{section}: {error}") from error


def check_compatible(net, autoencoder, data) -> None:
    """Combinations that each section's own checks cannot see: every clip shape must fit the model."""
    pt, ph, pw = net.patch_size
    for bucket in data.bucket_list:
        key = "data.buckets" if data.buckets else ("data.image_batch_size" if bucket.frames == 1 else "data")
        frames = bucket.frames // autoencoder.temporal_factor if bucket.frames > 1 else 1
        height, width = bucket.height // autoencoder.spatial_factor, bucket.width // autoencoder.spatial_factor
        if frames % pt or height % ph or width % pw:
            raise ConfigError(
                f"{key}: clips of {bucket.frames}x{bucket.height}x{bucket.width} (frames x height x "
                f"width) do not divide into model.patch_size {list(net.patch_size)}"
            )
        if frames > net.max_frames or max(height, width) > net.max_size:
            raise ConfigError(
                f"{key}: clips of {bucket.frames}x{bucket.height}x{bucket.width} exceed "
                f"model.max_frames={net.max_frames} / model.max_size={net.max_size}"
            )


@dataclass
class Parts:
    """Everything a run is built from, checked and constructed, before any training starts."""

    config: dict  # the resolved config as plain values
    text_encoder: Any
    autoencoder: Any
    net: Any
    objective: Any
    data: Any
    optim: Any
    trainer: Any
    logger: Any
    sampling: Any
    strategy: Any
    ema: Any
    evaluation: Any


def assemble(cfg: DictConfig) -> Parts:
    """Check the config and build every part from it; a ConfigError names the first bad key."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(config["seed"], int) or isinstance(config["seed"], bool):
        raise ConfigError(f"seed: expected int, got {config['seed']!r}")
    if config["resume"] not in ("auto", "never") and not Path(str(config["resume"])).exists():
        raise ConfigError(f"resume: expected auto, never or an existing checkpoint path, got {config['resume']!r}")
    if config["init_from"] is not None and not str(config["init_from"]).endswith(".safetensors"):
        raise ConfigError(
            f"init_from: expected a .safetensors weights file (scripts/export.py), got {config['init_from']!r}"
        )
    for key in ("init_strict", "init_ema"):
        if not isinstance(config[key], bool):
            raise ConfigError(f"{key}: expected true or false, got {config[key]!r}")
    check_config({k: config[k] for k in SECTIONS}, supplied={"model": {"in_channels", "text_dim"}})

    torch.manual_seed(cfg.seed)  # model init is a function of the seed
    text_encoder = build(cfg, "text")
    autoencoder = build(cfg, "autoencoder")
    net = build(cfg, "model", in_channels=autoencoder.latent_channels, text_dim=text_encoder.dim)
    if config["init_from"] is not None:
        init_from(net, config)
    parts = Parts(config, text_encoder, autoencoder, net, *(build(cfg, section) for section in SECTIONS[3:]))
    check_compatible(net, autoencoder, parts.data)
    check_ema_strategy(parts.ema, parts.strategy)
    check_sampler(parts.sampling, parts.objective)
    check_global_batch(parts.trainer, parts.data)
    return parts


def init_from(net, config: dict) -> None:
    """Load a weights file into the freshly built network: fine-tuning, or an image model into a video model.

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


def check_sampler(sampling, objective) -> None:
    """A sampler of another objective would fail only when the first videos are drawn, often at the end."""
    if sampling.sampler is not None and sampling.sampler not in objective.samplers:
        raise ConfigError(
            f"sampling.sampler: {sampling.sampler!r} is not a sampler of {type(objective).__name__} "
            f"(valid: {', '.join(objective.samplers)})"
        )


def check_ema_strategy(ema, strategy) -> None:
    """The EMA is a full float32 copy of the weights on every rank: only where every rank holds all of them."""
    sharded = getattr(strategy, "stage", None) == 3 or type(strategy).__name__ == "FSDP2"
    if ema.enabled and sharded:
        raise ConfigError(
            f"ema.enabled: an EMA is not supported with {type(strategy).__name__}"
            f"{' stage 3' if getattr(strategy, 'stage', None) == 3 else ''}, which shards the parameters "
            "(a full EMA copy per rank would undo the sharding); use ema.enabled=false, or ZeRO-2/DDP"
        )


def check_global_batch(settings, data) -> int:
    """Clips per optimizer step over all ranks (of data.batch_size: the first video bucket's); checked for every
    video bucket (every bucket, if all are images) against trainer.global_batch_size when that is set."""
    world_size, accumulate = settings.world_size(), settings.accumulate_grad_batches
    checked = [(i, b) for i, b in enumerate(data.bucket_list) if b.frames > 1] or list(enumerate(data.bucket_list))
    for index, bucket in checked:
        global_batch = bucket.batch_size * accumulate * world_size
        if settings.global_batch_size is not None and settings.global_batch_size != global_batch:
            key = f"data.buckets[{index}].batch_size" if data.buckets else "data.batch_size"
            raise ConfigError(
                f"trainer.global_batch_size: {settings.global_batch_size} != {key} {bucket.batch_size} x "
                f"trainer.accumulate_grad_batches {accumulate} x world size {world_size} = {global_batch}"
            )
    return data.batch_size * accumulate * world_size


def run_name(cfg: DictConfig) -> str:
    """The run's name: `name`, and in a Hydra multirun (-m) each job's own, `<name>-<job number>-<its overrides>`.

    The default name is a timestamp, so two jobs of a sweep started within one second would share a run directory
    (and resume=auto would continue the other job's run); the overrides say which job ran what.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return str(cfg.name)
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
    return f"{cfg.name}-{hydra_config.job.num}" + (f"-{label}" if label else "")


def main(cfg: DictConfig) -> dict:
    # first: from here on a stop signal (Slurm's SIGUSR1 or SIGTERM) is recorded, and acted on at the first step
    stop_requests = StopRequests()
    stop_requests.listen()
    parts = assemble(cfg)
    data, settings = parts.data, parts.trainer
    threads, why = threads_per_process(
        settings.threads_per_process, processes_per_node=settings.processes_per_node(), data_workers=data.num_workers
    )
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("intra-op threads per process: %d (%s)", torch.get_num_threads(), why)
    name = run_name(cfg)
    run_dir = RunDir(Path(str(cfg.run_root)) / name).create()
    try:
        resume_from = run_dir.checkpoint_to_resume(cfg.resume)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"resume: {error}") from error
    # every process runs this script (Lightning starts the others with the same command line, SLURM's srun
    # starts them all); what touches the run directory is done once
    from lightning.pytorch.utilities import rank_zero_only  # after vdm: see vdm/_torchvision_compat.py

    is_rank_zero = rank_zero_only.rank == 0
    if is_rank_zero:
        for partial in run_dir.remove_partial_checkpoints():
            log.warning("removed %s, a checkpoint whose save did not finish", partial)
        OmegaConf.save(OmegaConf.create(parts.config), run_dir.config)

    module = VideoDiffusion(
        parts.net,
        parts.objective,
        parts.text_encoder,
        parts.autoencoder,
        parts.optim,
        seed=cfg.seed,
        caption_dropout=settings.caption_dropout,
        parallelize=parts.strategy.parallelize,
        ema=parts.ema,
    )
    metrics_log = MetricsLog(run_dir.metrics)
    # the rows past the step this run starts from are logged again: drop them (a fresh start drops every row, of
    # an attempt that died before its first checkpoint)
    start_step = -1
    if resume_from is not None and (match := CHECKPOINT.match(resume_from.name)):
        start_step = int(match.group(1))
    if is_rank_zero:  # every rank rewriting the file at once can lose rows
        metrics_log.truncate_after(start_step)
    held_out = HeldOutLoss(data, metrics_log, settings.eval_every_n_steps) if data.eval_shard_list else None
    quality = None
    if parts.evaluation.enabled:
        quality_settings = dataclasses.replace(parts.sampling, prompts=[], weights="ema")

        def sample_for_quality(module, prompts, first_index):
            shape = {"num_frames": data.num_frames, "size": data.sample_size, "first_index": first_index}
            return module.sample(prompts, **shape, settings=quality_settings, ema=parts.evaluation.weights == "ema")

        quality = MovingDigitsQuality(
            sample_for_quality,
            metrics_log,
            parts.evaluation.every_n_steps,
            prompts=prompt_set()[: parts.evaluation.num_prompts],
            batch_size=parts.evaluation.batch_size,
            at_start=parts.evaluation.at_start,
            clips_dir=run_dir.samples,
        )
    callbacks = [
        StreamPosition(),
        ShardingReport(run_dir),
        TrainMetrics(metrics_log, settings.log_every_n_steps, peak_flops_per_device=settings.peak_flops_per_device),
        NonFiniteGuard(run_dir, metrics_log, settings.max_nonfinite_steps_in_row),  # before a save at this step
        *([held_out] if held_out else []),
        *([quality] if quality else []),
        SampleVideos(
            run_dir,
            parts.sampling,
            num_frames=data.num_frames,
            size=data.sample_size,
            every_n_steps=settings.sample_every_n_steps,
        ),
        checkpointing := Checkpointing(
            run_dir, settings.checkpoint_every_n_steps, settings.keep_last_checkpoints, settings.keep_every_n_steps
        ),
        preemption := Preemption(checkpointing, stop_requests),
        metrics_log,  # last: flushes what the others logged at this step
    ]
    strategy = parts.strategy.build(settings.world_size(), data.batch_size)
    prepare_resume(resume_from, settings.world_size(), strategy)  # on another number of processes: if it can
    logger = parts.logger.build(run_dir.path, name, parts.config) if is_rank_zero else None
    trainer = settings.build(callbacks, logger, strategy=strategy)
    log.info("run directory %s; %s", run_dir.path, f"resuming from {resume_from}" if resume_from else "new run")
    log.info(
        "model: %.2fM parameters; global batch %d = %d clips x %d accumulated x %d processes",
        sum(p.numel() for p in parts.net.parameters()) / 1e6,
        check_global_batch(settings, data),
        data.batch_size,
        settings.accumulate_grad_batches,
        settings.world_size(),
    )
    # a resumed run continues the data stream where its checkpoint stood (the position is in it)
    datamodule = VideoDataModule(data, seed=cfg.seed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)

    summary = {
        "run_dir": str(run_dir.path),
        "steps": trainer.global_step,
        "skipped": data.skips.counts(),
        "preempted": preemption.preempted,
    }
    if held_out and held_out.history:
        (first_step, first), (last_step, last) = held_out.history[0], held_out.history[-1]
        summary |= {"held_out_first": (first_step, first), "held_out_last": (last_step, last)}
        log.info("held-out loss: %.4f at step %d -> %.4f at step %d", first, first_step, last, last_step)
    if quality and quality.history:
        step, figures = quality.history[-1]
        summary |= {"digit_accuracy": figures["eval/digit_acc"], "motion_accuracy": figures["eval/motion_acc"]}
        log.info(
            "generated clips at step %d (%d prompts): digit accuracy %.1f%%, motion accuracy %.1f%% "
            "(real held-out clips score 98%% and 100%%; chance is 10%% and 12.5%%)",
            step,
            len(quality.prompts),
            100 * figures["eval/digit_acc"],
            100 * figures["eval/motion_acc"],
        )
    log.info("skipped samples: %s", data.skips.counts())
    if logger is not None and hasattr(logger, "finish"):
        logger.finish()
    return summary


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
    with initialize_config_dir(str(Path(__file__).resolve().parent / "conf"), version_base="1.3"):
        try:
            compose(config_name, overrides=first_values)
        except HydraException as error:
            message = str(error).split("\nConfig search path")[0].strip()
            if match := re.match(r"Could not override '([^']+)'", message):
                key = match.group(1)
                raise ConfigError(f"{key}: no such key (a new key needs +{key}=...)") from error
            raise ConfigError(" ".join(line.strip() for line in message.splitlines() if line.strip())) from error


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
