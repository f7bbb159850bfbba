"""Resuming on another number of processes: what each kind of checkpoint allows, decided before training.

- A single file (DDP, or one process) holds everything whole: it loads on any number of processes.
- A distributed checkpoint (FSDP2: torch.distributed.checkpoint, one `.distcp` file per rank) is
  re-sharded by torch.distributed.checkpoint as it loads.
- A DeepSpeed ZeRO directory holds each rank's partition of the optimizer states (stage 3: of the
  parameters too), which DeepSpeed cannot re-partition. DeepSpeed's universal checkpoint can be: once
  `ds_to_universal` has written a universal copy into the checkpoint directory, the run loads that copy
  (DeepSpeed's `checkpoint.load_universal`); until then the run stops here, naming the command. A ZeRO-3
  run's EMA is kept as each rank's partitions beside DeepSpeed's state, which the universal copy does not
  carry: with an EMA the run stops here too, naming the ways on.

The data stream is re-derived for the new layout by the data module (vdm.data.reshard).
"""

from __future__ import annotations

import logging
from pathlib import Path

from vdm.checkpoints import CheckpointError, checkpoint_layout, deepspeed_client_state, zero3_ema_layout
from vdm.config_check import ConfigError

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # the universal copy's folder in a DeepSpeed checkpoint directory


def prepare_resume(checkpoint: Path | None, world_size: int, strategy, ema: bool = False) -> None:
    """Stop with the way out if `checkpoint` cannot be loaded by `world_size` processes; else make `strategy`
    load it (a DeepSpeed checkpoint's universal copy, when the number of processes changed). `ema`: the run keeps
    an EMA, which a ZeRO-3 checkpoint holds as each rank's partitions (vdm.distributed.shards)."""
    if checkpoint is None:
        return
    try:
        layout = checkpoint_layout(checkpoint)
    except CheckpointError as error:
        raise ConfigError(f"resume: {error}") from error
    writers = layout.writers
    if writers is None or writers == world_size:
        return
    log.warning("resume: %s was written by %d processes, this run has %d", checkpoint, writers, world_size)
    if layout.kind != "deepspeed":
        return  # torch.distributed.checkpoint re-shards it
    if not isinstance(getattr(strategy, "config", None), dict):
        raise ConfigError(f"resume: {checkpoint} is a DeepSpeed checkpoint; resume it with a DeepSpeed strategy")
    if ema and zero3_ema_layout(deepspeed_client_state(layout)[0]):
        raise ConfigError(
            f"resume: {checkpoint} holds an EMA partitioned by ZeRO-3 over {writers} processes (each rank's file "
            f"its part), which is not re-cut for {world_size}: resume with {writers} processes; or start a new run "
            f"from its weights and EMA (init_from={checkpoint} init_ema=true: the EMA is joined from the parts), "
            "or drop the EMA (ema.enabled=false)"
        )
    if not (checkpoint / "latest_universal").is_file():
        raise ConfigError(
            f"resume: {checkpoint} is a DeepSpeed ZeRO checkpoint written by {writers} processes and this run has "
            f"{world_size}; DeepSpeed re-partitions only a universal checkpoint. Write a universal copy into it once:\n"
            f"  python -m deepspeed.checkpoint.ds_to_universal --input_folder {checkpoint / layout.tag} "
            f"--output_folder {checkpoint / UNIVERSAL} --inject_missing_state\n"
            "then run the same command again: the run resumes from the universal copy."
        )
    log.warning("resume: loading the universal copy of %s (DeepSpeed re-partitions it)", checkpoint)
    strategy.config.setdefault("checkpoint", {})["load_universal"] = True
