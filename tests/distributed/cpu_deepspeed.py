"""DeepSpeed under Lightning on CPU processes (gloo), for tests only.

Lightning's DeepSpeedStrategy refuses anything but CUDA; DeepSpeed itself runs ZeRO 1/2/3 on CPU. This
subclass skips the CUDA check and the device-index validation and gives DeepSpeed a device rank, as
measured in ../shared/ENVIRONMENT.md. It touches private Lightning methods: it lives in tests/ and is
chosen with `strategy._target_=tests.distributed.cpu_deepspeed.CPUDeepSpeedZeRO`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402

from vdm.distributed import DeepSpeedZeRO  # noqa: E402

# a C++ shared-memory communication op that would need a g++ JIT build (30 s) on first use
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # the parent's, without its CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


@dataclass
class CPUDeepSpeedZeRO(DeepSpeedZeRO):
    def build(self, world_size: int = 2, micro_batch_size: int = 1):
        import logging

        return CPUDeepSpeedStrategy(
            **self.strategy_kwargs(micro_batch_size),
            logging_level=getattr(logging, self.logging_level),
            process_group_backend="gloo",
        )
