"""Checks across config sections: what each section's own checks (vdm.config_check, the settings classes'
__post_init__) cannot see. They run on the built parts, before anything trains; each raises a ConfigError that
names the key to change."""

from __future__ import annotations

from pathlib import Path

from vdm.config_check import ConfigError
from vdm.latent_cache import cache_key


def missing_values(config: object, prefix: str = "") -> list[str]:
    """The keys a config leaves to the user (Hydra's `???`), by their full names."""
    if isinstance(config, dict):
        return [m for k, v in config.items() for m in missing_values(v, f"{prefix}{k}.")]
    if isinstance(config, list):
        return [m for i, v in enumerate(config) for m in missing_values(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if config == "???" else []


def check_run_keys(config: dict) -> None:
    """The top-level keys of conf/config.yaml, which have no settings class of their own; and that no key is
    left without its value (a preset's `???`, e.g. text=t5_xxl's text.path)."""
    missing = missing_values(config)
    if missing:
        raise ConfigError(f"{', '.join(missing)}: a value is required (e.g. {missing[0]}=...)")
    if not isinstance(config["seed"], int) or isinstance(config["seed"], bool):
        raise ConfigError(f"seed: expected int, got {config['seed']!r}")
    if config["resume"] not in ("auto", "never") and not Path(str(config["resume"])).exists():
        raise ConfigError(f"resume: expected auto, never or an existing checkpoint path, got {config['resume']!r}")
    if config["init_from"] is not None and not Path(str(config["init_from"])).exists():
        raise ConfigError(
            f"init_from: expected a .safetensors weights file or a training checkpoint, got {config['init_from']!r} "
            "(no such file or directory)"
        )
    for key in ("init_strict", "init_ema", "init_parity_check"):
        if not isinstance(config[key], bool):
            raise ConfigError(f"{key}: expected true or false, got {config[key]!r}")
    tolerance = config["init_parity_tolerance"]
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
        raise ConfigError(f"init_parity_tolerance: expected a number >= 0, got {tolerance!r}")


def check_compatible(net, autoencoder, data) -> None:
    """Every clip shape of the data must fit the model, after the autoencoder's compression."""
    pt, ph, pw = net.patch_size
    for bucket in data.bucket_list:
        key = "data.buckets" if data.buckets else ("data.image_batch_size" if bucket.frames == 1 else "data")
        try:
            frames, height, width = autoencoder.latent_shape(bucket.frames, bucket.height, bucket.width)
        except ValueError as error:  # the autoencoder's own rule (a spatial factor, Wan's 1 + 4k frames)
            raise ConfigError(f"{key}: clips of {bucket.frames}x{bucket.height}x{bucket.width}: {error}") from None
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


def check_sampler(sampling, objective) -> None:
    """A sampler of another objective would fail only when the first videos are drawn, often at the end."""
    if sampling.sampler is not None and sampling.sampler not in objective.samplers:
        raise ConfigError(
            f"sampling.sampler: {sampling.sampler!r} is not a sampler of {type(objective).__name__} "
            f"(valid: {', '.join(objective.samplers)})"
        )


def check_global_batch(settings, data, sequence_parallel_size: int = 1) -> int:
    """Clips per optimizer step over all ranks (of data.batch_size: the first video bucket's); checked for every
    video bucket (every bucket, if all are images) against trainer.global_batch_size when that is set. The ranks
    of a sequence-parallel group share their clips: the world size counts world / sequence_parallel_size."""
    world_size, accumulate = settings.world_size() // sequence_parallel_size, settings.accumulate_grad_batches
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


def check_cache(parts) -> None:
    """A latent cache to train from was made from this run's shards, transforms, autoencoder and text encoder,
    and is complete; else a ConfigError naming what differs (vdm.data.cache)."""
    data = parts.data
    if data.latent_cache is None:
        return
    config = parts.config
    key = cache_key(data, config["autoencoder"], parts.autoencoder, config["text"], parts.text_encoder)
    try:
        data.latent_cache.check(key)
    except ValueError as error:
        raise ConfigError(f"data.cache: {error}") from None


def check_sequence_parallel(parts) -> None:
    """strategy.sequence_parallel_size N: the world splits into groups of N, every clip's patch frames and the
    model's heads into N parts (vdm/distributed/sequence.py); the Moving Digits evaluation is not split yet."""
    size = parts.strategy.sequence_parallel_size
    if size == 1:
        return
    key = "strategy.sequence_parallel_size"
    world_size = parts.trainer.world_size()
    if world_size % size:
        raise ConfigError(f"{key}: world size {world_size} (trainer.devices x num_nodes) is not divisible by {size}")
    net = parts.net
    if getattr(net, "set_sequence_parallel", None) is None:
        raise ConfigError(f"{key}: {type(net).__name__} has no sequence parallelism (SpaceTimeDiT has)")
    if net.temporal and net.heads % size:
        raise ConfigError(f"{key}: model.heads={net.heads} is not divisible by {size}")
    for bucket in parts.data.bucket_list:
        frames = parts.autoencoder.latent_shape(bucket.frames, bucket.height, bucket.width)[0] // net.patch_size[0]
        if frames % size:
            raise ConfigError(
                f"{key}: clips of {bucket.frames}x{bucket.height}x{bucket.width} have {frames} patch frames, "
                f"not divisible by {size} (each rank of a group takes whole frames)"
            )
    if parts.evaluation.enabled:
        raise ConfigError(f"{key}: the Moving Digits evaluation does not run split yet; set evaluation=none")


def check_parts(parts) -> None:
    """Every cross-section check, on the built parts of a run (train.py's Parts)."""
    check_compatible(parts.net, parts.autoencoder, parts.data)
    check_cache(parts)
    check_sampler(parts.sampling, parts.objective)
    check_sequence_parallel(parts)
    check_global_batch(parts.trainer, parts.data, parts.strategy.sequence_parallel_size)
