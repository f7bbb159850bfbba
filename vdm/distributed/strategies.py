"""Lightning strategies from typed settings: DDP, DeepSpeed ZeRO 1/2/3 (with CPU offload), FSDP2.

Each settings class says what it does (`shards_parameters`, `name`), so config checks ask it rather than its type.

Parallelism is applied from outside the model: the network names its block class
(`SpaceTimeDiT.block_class`) and offers activation checkpointing; the strategies here wrap it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn


def check_sequence_parallel_size(size: object) -> None:
    """Sequence parallelism works under every strategy here: each rank of a group computes the whole clip's loss
    (vdm/distributed/sequence.py), so the gradient mean over all ranks that DDP, ZeRO and FSDP2 each take is the
    unsplit gradient, however the weights are sharded."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"sequence_parallel_size must be an int >= 1 (got {size!r})")


@dataclass
class DDP:
    """Data parallel: every rank holds the whole model and optimizer; gradients are all-reduced.

    sequence_parallel_size N > 1 splits each clip's frames over groups of N consecutive ranks
    (vdm/distributed/sequence.py): the ranks of a group train on the same clips, the world / N groups are the
    data-parallel replicas, and DDP's mean over all ranks is then the unsplit gradient (see there why).
    """

    bucket_cap_mb: int = 25  # gradients are reduced in buckets of this size, overlapping the backward pass
    gradient_as_bucket_view: bool = True  # gradients live in the buckets: no extra copy
    find_unused_parameters: bool = False
    timeout_minutes: int = 30
    sequence_parallel_size: int = 1  # ranks that share each clip, split by frames (1: off)

    def __post_init__(self):
        check_sequence_parallel_size(self.sequence_parallel_size)

    shards_parameters = False  # every rank holds every parameter
    name = "DDP"

    def build(self, world_size: int = 2, micro_batch_size: int = 1):
        if world_size == 1:
            return "auto"  # one process: nothing to synchronize
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            bucket_cap_mb=self.bucket_cap_mb,
            gradient_as_bucket_view=self.gradient_as_bucket_view,
            find_unused_parameters=self.find_unused_parameters,
            timeout=timedelta(minutes=self.timeout_minutes),
        )

    def parallelize(self, net: nn.Module, device_mesh=None) -> nn.Module:
        return net


@dataclass
class DeepSpeedZeRO:
    """DeepSpeed ZeRO: stage 1 partitions optimizer states, 2 also gradients, 3 also parameters."""

    stage: int = 2
    offload_optimizer: bool = False  # optimizer states (and step) on the CPU
    offload_parameters: bool = False  # stage 3 only: parameters on the CPU between uses
    overlap_comm: bool = True  # reduce gradients while the backward pass goes on
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are made: less fragmentation
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather (stages 1, 2)
    logging_level: str = "WARNING"
    sequence_parallel_size: int = 1  # ranks that share each clip, split by frames (1: off)

    def __post_init__(self):
        check_sequence_parallel_size(self.sequence_parallel_size)
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3 (got {self.stage})")
        if self.offload_parameters and self.stage != 3:
            raise ValueError("offload_parameters needs stage 3 (parameters are partitioned only there)")

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage}"

    def build(self, world_size: int = 2, micro_batch_size: int = 1):
        import logging

        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(
            **self.strategy_kwargs(micro_batch_size), logging_level=getattr(logging, self.logging_level)
        )

    def strategy_kwargs(self, micro_batch_size: int) -> dict:
        return dict(
            # DeepSpeed's config wants it; Lightning would look for a batch sampler, which streams do not have
            logging_batch_size_per_gpu=micro_batch_size,
            stage=self.stage,
            offload_optimizer=self.offload_optimizer,
            offload_parameters=self.offload_parameters,
            overlap_comm=self.overlap_comm,
            contiguous_gradients=self.contiguous_gradients,
            reduce_bucket_size=self.reduce_bucket_size,
            allgather_bucket_size=self.allgather_bucket_size,
        )

    def parallelize(self, net: nn.Module, device_mesh=None) -> nn.Module:
        return net


@dataclass
class FSDP2:
    """PyTorch FSDP2 (`fully_shard`): each block, then the rest, sharded over the data-parallel ranks."""

    reshard_after_forward: bool = True  # free gathered block weights after forward (ZeRO-3-like memory)
    mixed_precision: bool = True  # bf16 compute, fp32 reduction, on a GPU
    timeout_minutes: int = 30
    sequence_parallel_size: int = 1  # ranks that share each clip, split by frames (1: off)

    shards_parameters = True
    name = "FSDP2"

    def __post_init__(self):
        check_sequence_parallel_size(self.sequence_parallel_size)

    def build(self, world_size: int = 2, micro_batch_size: int = 1):
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size=world_size, tensor_parallel_size=1, timeout=timedelta(minutes=self.timeout_minutes)
        )

    def parallelize(self, net: nn.Module, device_mesh) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = device_mesh["data_parallel"]
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.mixed_precision and torch.cuda.is_available()
            else MixedPrecisionPolicy()
        )
        for module in net.modules():
            if isinstance(module, net.block_class):
                fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        fully_shard(net, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        return net
