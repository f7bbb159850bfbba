"""sharding/rank-<r>.json: what each rank holds of the parameters and the optimizer states."""

from __future__ import annotations

import json
import logging

import lightning as L
import torch

from vdm.distributed.parallel import full_numel, innermost_optimizer, local_part, strategy_name
from vdm.training.run_dir import RunDir

log = logging.getLogger(__name__)


class ShardingReport(L.Callback):
    """What each rank holds after the first optimizer step: parameter and optimizer-state elements.

    Written to sharding/rank-<r>.json in the run directory and logged: under DDP every rank holds
    everything; ZeRO 1/2 split the optimizer states, ZeRO-3 and FSDP2 the parameters too (and the EMA with them).
    """

    def __init__(self, run_dir: RunDir):
        self.run_dir, self.done = run_dir, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step < 1:
            return
        self.done = True
        params = list(pl_module.net.parameters())
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": strategy_name(trainer.strategy),
            "parameters_total": sum(full_numel(p) for p in params),
            "parameters_local": sum(local_part(p).numel() for p in params),
            # staged fine-tuning: frozen parameters hold no optimizer state
            "parameters_trainable": sum(full_numel(p) for p in params if p.requires_grad),
            "optimizer_state_local": sum(
                local_part(value).numel()
                for state in innermost_optimizer(trainer.optimizers[0]).state.values()
                for value in state.values()
                if isinstance(value, torch.Tensor) and value.dim() > 0
            ),
            # float32 elements of this rank's EMA: its shard of every parameter (0 without an EMA)
            "ema_local": sum(w.numel() for w in pl_module.ema.weights.values()) if pl_module.ema is not None else 0,
        }
        folder = self.run_dir.path / "sharding"
        folder.mkdir(exist_ok=True)
        (folder / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report, indent=1) + "\n")
        log.info(
            "rank %d holds %d of %d parameters (%d trainable), %d optimizer-state and %d EMA elements (%s)",
            report["rank"],
            report["parameters_local"],
            report["parameters_total"],
            report["parameters_trainable"],
            report["optimizer_state_local"],
            report["ema_local"],
            report["strategy"],
        )
