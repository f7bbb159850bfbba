"""Sequence parallelism (vdm/distributed/sequence.py) computes the unsplit network: 2 gloo CPU processes.

At the network: each process builds the same tiny SpaceTimeDiT from one seed three times: a reference that sees the
whole clip, and two split by frames over the 2 ranks (one recomputing its attention in the backward pass). Over 3
AdamW steps the split ones' gathered output, loss and gradients (mean over the ranks, as DDP takes it) must be the
reference's to fp32 tolerance, so the weights stay equal too.
Every parameter is drawn at random first: with vdm's zero init, most gates would be 0 and the temporal branch
(the only one that communicates) would get no gradient in 3 steps.

Through train.py: 2 processes with strategy.sequence_parallel_size=2 log the losses, gradient norms and held-out
losses of 1 process, step by step; and the sizes and strategies that cannot be split are refused at start.
"""

from __future__ import annotations

import csv
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

import train
from tests.runs import run_train, succeeded, train_env
from vdm.config_check import ConfigError
from vdm.distributed.sequence import enable
from vdm.models import SpaceTimeDiT
from vdm.run_checks import check_global_batch
from vdm.types import TextCond

SIZES = dict(in_channels=4, text_dim=16, width=128, depth=4, heads=4, patch_size=(1, 4, 4))  # conf/model/dit_tiny
B, T, HW, L = 2, 4, 16, 5
STEPS = 3


def tiny(seed: int = 0, **options) -> SpaceTimeDiT:
    torch.manual_seed(seed)
    net = SpaceTimeDiT(**{**SIZES, **options})
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.05)
    return net


def inputs(step: int) -> tuple[torch.Tensor, torch.Tensor, TextCond, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(B, SIZES["in_channels"], T, HW, HW, generator=g)
    t = torch.rand(B, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    cond = TextCond(
        torch.randn(B, L, SIZES["text_dim"], generator=g), mask, torch.randn(B, SIZES["text_dim"], generator=g)
    )
    return x, t, cond, torch.randn(x.shape, generator=g)


def loss_of(net, x, t, cond, target) -> torch.Tensor:
    return ((net(x, t, cond) - target) ** 2).mean(dim=(1, 2, 3, 4)).mean()  # per clip, then the batch


def worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        reference = tiny()
        splits = {"plain": tiny(), "recomputed": tiny(grad_checkpointing=True, grad_checkpointing_scope="attention")}
        for net in splits.values():
            enable(net)
        nets = {"reference": reference, **splits}
        optimizers = {name: torch.optim.AdamW(net.parameters(), lr=1e-3) for name, net in nets.items()}
        for step in range(STEPS):
            x, t, cond, target = inputs(step)
            losses = {}
            for name, net in nets.items():
                optimizers[name].zero_grad()
                losses[name] = loss_of(net, x, t, cond, target)
                losses[name].backward()
                if name != "reference":
                    for param in net.parameters():  # what DDP does: the mean over all ranks
                        dist.all_reduce(param.grad)
                        param.grad /= world
            for name in splits:
                torch.testing.assert_close(losses[name], losses["reference"], rtol=1e-5, atol=1e-6)
                for (key, param), ref in zip(nets[name].named_parameters(), reference.parameters()):
                    assert param.grad is not None and ref.grad.abs().sum() > 0, key
                    torch.testing.assert_close(param.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
            for optimizer in optimizers.values():
                optimizer.step()
        with torch.no_grad():
            x, t, cond, _ = inputs(STEPS)
            torch.testing.assert_close(splits["plain"](x, t, cond), reference(x, t, cond), rtol=1e-5, atol=1e-5)

        # sizes that do not split: an error naming them, raised on every rank before any collective
        with pytest.raises(ValueError, match=r"patch frames \(T / pt\) divisible by 2 \(got .*=3\)"):
            splits["plain"](x[:, :, :3], t, cond)
        with pytest.raises(ValueError, match=r"heads divisible by 2 \(got heads=3\)"):
            enable(SpaceTimeDiT(**{**SIZES, "width": 96, "heads": 3}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_by_frames_give_the_unsplit_loss_gradients_and_weights(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


SP = "strategy.sequence_parallel_size"
CPU_ZERO = "strategy._target_=tests.distributed.cpu_deepspeed.CPUDeepSpeedZeRO"  # DeepSpeed on CPU processes
CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([f"{SP}=0"], "sequence_parallel_size must be an int >= 1"),
        (["trainer.devices=3", f"{SP}=2", "evaluation=none"], "world size 3 .* is not divisible by 2"),
        (["trainer.devices=4", f"{SP}=4", "model.heads=2", "evaluation=none"], "model.heads=2 is not divisible by 4"),
        (["trainer.devices=4", f"{SP}=4", "data.num_frames=6", "evaluation=none"], "6 patch frames, not divisible"),
        (["trainer.devices=2", f"{SP}=2", "data.image_batch_size=8", "evaluation=none"], "1 patch frames"),
        (["trainer.devices=2", f"{SP}=2"], "evaluation does not run split yet"),
    ],
)
def test_what_cannot_be_split_is_refused_at_start_naming_the_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.assemble(compose_config(*overrides))


def test_the_global_batch_counts_the_clips_once_per_sequence_parallel_group():
    parts = train.assemble(compose_config("trainer.devices=4", f"{SP}=2", "evaluation=none", "data.batch_size=3"))
    assert parts.strategy.sequence_parallel_size == 2
    assert check_global_batch(parts.trainer, parts.data, 2) == 3 * 2


RUN = [
    *("logger=none", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "trainer.progress_bar=false"),
    *("trainer.eval_every_n_steps=0", "trainer.max_steps=3"),
    *("data.batch_size=2", "data.num_workers=0", "data.eval_clips=4", "sampling.prompts=[]", "evaluation=none"),
    "optim.warmup_steps=0",  # the weights move from the first step
]


def metrics(run: Path) -> dict[int, dict[str, float]]:
    keys = ("train/loss", "grad_norm", "val/loss", "train/loss_t1")
    with open(run / "metrics.csv", newline="") as file:
        return {int(r["step"]): {k: float(r[k]) for k in keys if r.get(k)} for r in csv.DictReader(file)}


@pytest.mark.slow
def test_train_py_split_over_two_processes_logs_the_losses_of_one(tmp_path):
    env = train_env(OMP_NUM_THREADS="1")
    # the split run also checkpoints at step 2, to be resumed from there below
    layouts = {
        "one": ["trainer.devices=1", "trainer.checkpoint_every_n_steps=0"],
        "sp": ["trainer.devices=2", f"{SP}=2", "trainer.checkpoint_every_n_steps=2"],
        # the split under sharded weights: FSDP2, and DeepSpeed ZeRO-2 (on CPU through the tests' strategy)
        "fsdp2": ["trainer.devices=2", f"{SP}=2", "strategy=fsdp2", "trainer.checkpoint_every_n_steps=0"],
        "zero2": [
            "trainer.devices=2",
            f"{SP}=2",
            "strategy=deepspeed_zero2",
            CPU_ZERO,
            "trainer.checkpoint_every_n_steps=0",
        ],
    }

    def run(name: str):
        return succeeded(run_train(f"run_root={tmp_path}", f"name={name}", *RUN, *layouts[name], env=env, timeout=300))

    with ThreadPoolExecutor(2) as pool:  # side by side: most of each run's time is starting up
        output = {name: result.stdout + result.stderr for name, result in zip(layouts, pool.map(run, layouts))}
    # the split did happen (two unsplit replicas of the same clips would log the same losses too)
    for rank, name in itertools.product((0, 1), ("sp", "fsdp2", "zero2")):
        assert f"sequence parallelism: rank {rank} is {rank} of 2 in its group" in output[name], name
    assert "sequence parallelism" not in output["one"]
    one = metrics(tmp_path / "one")
    assert sorted(one) == [0, 1, 2, 3] and "val/loss" in one[0] and "val/loss" in one[3]
    for name in ("sp", "fsdp2", "zero2"):
        split = metrics(tmp_path / name)
        assert sorted(split) == sorted(one), name
        for step in one:
            assert one[step].keys() == split[step].keys(), (name, step)
            for key, value in one[step].items():
                assert split[step][key] == pytest.approx(value, rel=1e-4), (name, step, key)
    split = metrics(tmp_path / "sp")
    # resumed from its step-2 checkpoint, the split run's last step is the uninterrupted one's, exactly
    step_2 = tmp_path / "sp" / "checkpoints" / "step-000000002.ckpt"
    resumed = [f"run_root={tmp_path}", "name=resumed", f"resume={step_2}", *RUN, *layouts["sp"]]
    succeeded(run_train(*resumed, env=env, timeout=300))
    again = metrics(tmp_path / "resumed")
    assert again[3]["train/loss"] == split[3]["train/loss"] and again[3]["grad_norm"] == split[3]["grad_norm"]
