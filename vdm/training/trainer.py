"""Trainer settings (typed, checked) and the Lightning Trainer built from them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import lightning as L
import torch


@dataclass
class TrainerSettings:
    max_steps: int = 1000
    accelerator: str = "auto"  # auto, cpu, gpu
    devices: int | str = "auto"  # processes per node
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step
    global_batch_size: int | None = None  # if set: must equal data.batch_size x accumulate x world size
    gradient_clip: float = 1.0  # max gradient norm; 0 turns clipping off (the norm is still logged)
    caption_dropout: float = 0.1  # share of captions replaced by "" (trains the unconditional model for CFG)
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 200  # held-out loss; 0: only at start and end
    checkpoint_every_n_steps: int = 500
    keep_last_checkpoints: int = 2
    keep_every_n_steps: int = 0  # > 0: also keep every checkpoint whose step is a multiple of this, for good
    sample_every_n_steps: int = 0  # 0: sample videos at the end only
    max_nonfinite_steps_in_row: int = 5  # optimizer steps skipped for a non-finite loss/gradient before the run stops
    # FLOP/s of one device at the run's precision, for MFU on a GPU that vdm.training.throughput's table lacks
    peak_flops_per_device: float | None = None
    # intra-op threads of each training process; None: OMP_NUM_THREADS, else the Slurm allocation's cores of this
    # task, else the cores shared by the training processes of the node, less one per data worker (threads.py)
    threads_per_process: int | None = None
    progress_bar: bool = True

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (got {self.max_steps})")
        for name in (
            "log_every_n_steps",
            "keep_last_checkpoints",
            "num_nodes",
            "accumulate_grad_batches",
            "max_nonfinite_steps_in_row",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in (
            "eval_every_n_steps",
            "checkpoint_every_n_steps",
            "sample_every_n_steps",
            "gradient_clip",
            "keep_every_n_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.threads_per_process is not None and self.threads_per_process < 1:
            raise ValueError(f"threads_per_process must be null or >= 1 (got {self.threads_per_process})")
        precisions = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
        if self.precision not in precisions:
            raise ValueError(f"precision must be one of {', '.join(precisions)} (got {self.precision!r})")

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        on_gpu = self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.is_available())
        return "bf16-mixed" if on_gpu else "32-true"

    def world_size(self) -> int:
        """Processes over all nodes, known before any of them starts."""
        if isinstance(self.devices, int):
            per_node = self.devices
        elif self.devices == "auto":
            on_gpu = self.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
            per_node = torch.cuda.device_count() if on_gpu else 1
        else:
            per_node = len(str(self.devices).split(","))
        return per_node * self.num_nodes

    def processes_per_node(self) -> int:
        return self.world_size() // self.num_nodes

    def build(self, callbacks: list[L.Callback], logger, strategy="auto") -> L.Trainer:
        from vdm.training.checkpoint_io import DirectCheckpointIO

        plugins = [DirectCheckpointIO()]
        if os.environ.get("SLURM_NTASKS") and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
            # vdm.training.preemption checkpoints and requeues on SIGUSR1/SIGTERM; Lightning's own
            # requeue (which saves elsewhere) stays off
            from lightning.pytorch.plugins.environments import SLURMEnvironment

            plugins.append(SLURMEnvironment(auto_requeue=False))
        return L.Trainer(
            max_steps=self.max_steps,
            accelerator=self.accelerator,
            devices=self.devices,
            num_nodes=self.num_nodes,
            strategy=strategy,
            plugins=plugins,
            accumulate_grad_batches=self.accumulate_grad_batches,
            precision=self.resolved_precision(),
            gradient_clip_val=self.gradient_clip or None,
            callbacks=callbacks,
            logger=logger if logger is not None else False,
            enable_checkpointing=False,  # vdm.training.checkpointing.Checkpointing saves atomically instead
            enable_progress_bar=self.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=self.log_every_n_steps,
            use_distributed_sampler=False,  # the WebDataset pipeline splits by rank itself
            default_root_dir=None,
        )
