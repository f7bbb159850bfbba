"""scripts/export.py: real checkpoints (train.py's Lightning file; Lightning DeepSpeed ZeRO 1/2/3 and FSDP2
directories written by 2 CPU processes) become weights files that hold exactly the network's trained weights.

Run as a script (once per rank, see `sharded_runs`), this file writes the sharded checkpoints:
`python tests/scripts/test_export.py sharded OUT zero1 zero2 zero3 fsdp2`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scripts.export import export, main
from tests.runs import train_two_steps
from vdm.checkpoints import CheckpointError, network_weights
from vdm.models import SpaceTimeDiT
from vdm.models.weights import build_from_weights, read_metadata, read_weights_file
from vdm.types import TextCond

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(in_channels=3, text_dim=16, width=32, depth=2, heads=2, patch_size=[1, 2, 2])
RUN_CONFIG = {  # what the exporter reads of a run's config.yaml (in_channels, text_dim: from the weights)
    "model": {
        "_target_": "vdm.models.SpaceTimeDiT",
        **{k: v for k, v in TINY.items() if k not in ("in_channels", "text_dim")},
    },
}
STEP = "step-000000001.ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the sharded checkpoint writer (2 processes)


def write_sharded_checkpoints(out: Path, kinds: list[str]) -> None:
    """For each kind (zero1, zero2, zero3, fsdp2): two steps of a tiny VideoDiffusion-shaped LightningModule
    (the network is `self.net`) under Lightning's DeepSpeedStrategy (ZeRO stage 1, 2, 3) or
    ModelParallelStrategy (FSDP2, as vdm.distributed.FSDP2 shards it) on 2 CPU processes, then
    trainer.save_checkpoint, as train.py's Checkpointing does, to out/<kind>/checkpoints/STEP. Rank 0 also
    writes the trained weights, gathered over the ranks by the strategy itself, to out/<kind>/reference.pt.

    Run once per rank with LOCAL_RANK, NODE_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set: the two
    processes start (and import) side by side instead of Lightning launching the second one after the first."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import argparse

    import deepspeed  # (vdm, imported above through scripts.export, made torchvision importable first)
    import lightning as L
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a g++ JIT build

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):  # Lightning refuses CPU; DeepSpeed runs ZeRO there (gloo)
        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            engine, optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
            return engine, optimizer

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = SpaceTimeDiT(**TINY)
            with torch.no_grad():
                for p in self.net.parameters():
                    torch.nn.init.normal_(p, std=0.05)
            # a stand-in EMA, kept outside the module tree and saved the way a callback would save one
            self.ema = {k: v.detach().clone() * 0.5 for k, v in self.net.state_dict().items()}

        def training_step(self, batch, batch_idx):
            g = torch.Generator().manual_seed(self.global_rank * 100 + batch_idx)
            x = torch.randn(2, 3, 2, 4, 4, generator=g)
            cond = TextCond(
                torch.randn(2, 3, 16, generator=g), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 16, generator=g)
            )
            return (self.net(x, torch.rand(2, generator=g), cond) - x).square().mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.net.parameters(), lr=1e-2)

        def on_save_checkpoint(self, checkpoint):
            checkpoint["ema_state_dict"] = {f"net.{k}": v for k, v in self.ema.items()}

    class ShardedModule(Module):
        def configure_model(self):  # what vdm.distributed.FSDP2.parallelize does
            mesh = self.device_mesh["data_parallel"]
            for block in self.net.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    for kind in kinds:
        run = out / kind
        if kind == "fsdp2":
            module = ShardedModule()
            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        else:
            module = Module()
            strategy = CPUDeepSpeedStrategy(stage=int(kind.removeprefix("zero")), process_group_backend="gloo")
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, torch.utils.data.DataLoader(range(8), batch_size=1))
        trainer.save_checkpoint(run / "checkpoints" / STEP)

        if kind == "fsdp2":  # DTensor shards -> full tensors (collective)
            reference = {k: v.full_tensor().detach().clone() for k, v in module.net.state_dict().items()}
        else:
            params = list(module.net.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=kind == "zero3"):  # collective
                reference = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save({"net": reference, "ema": module.ema}, run / "reference.pt")


# ---------------------------------------------------------------- helpers


def run_config_yaml(run: Path, config: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def assert_equal_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def computes(net: SpaceTimeDiT, text_dim: int, frames: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.in_channels, frames, size, size, generator=g)
    cond = TextCond(
        torch.randn(2, 4, text_dim, generator=g),
        torch.ones(2, 4, dtype=torch.bool),
        torch.randn(2, text_dim, generator=g),
    )
    with torch.no_grad():
        out = net(x, torch.rand(2, generator=g), cond)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0
    return out


# ---------------------------------------------------------------- train.py's Lightning checkpoint


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 2-step run of train.py (the dit_tiny default with the clip-tiny text encoder)."""
    return train_two_steps(
        tmp_path_factory.mktemp("runs"),
        "trainer.eval_every_n_steps=0",
        "data.eval_clips=4",
        "sampling.prompts=[]",
    )


@pytest.mark.slow
def test_export_of_a_train_py_checkpoint_is_its_network(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "step-000000002.ckpt"
    out = tmp_path / "model.safetensors"
    assert main([str(checkpoint), "--out", str(out)]) == 0  # the config is found in the run directory
    printed = capsys.readouterr().out
    assert "weights_only=True" in printed and "EMA:        yes" in printed and "142 (" in printed

    checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stored = checkpoint["state_dict"]
    net_weights = {k.removeprefix("net."): v for k, v in stored.items() if k.startswith("net.")}
    config, weights = read_weights_file(out)
    assert_equal_state(weights, net_weights)
    assert_equal_state(read_weights_file(out, ema=True)[1], checkpoint["ema"]["weights"])  # the run's own EMA
    run_model = {
        k: v for k, v in yaml.safe_load((trained_run / "config.yaml").read_text())["model"].items() if k != "_target_"
    }
    assert config == {**run_model, "in_channels": 3, "text_dim": 64}  # clip-tiny is 64 wide

    net = build_from_weights(out)
    assert_equal_state(net.state_dict(), net_weights)
    computes(net, text_dim=64, frames=4, size=16)
    assert "lightning" in read_metadata(out)["vdm_export"]


@pytest.mark.slow
def test_ema_in_a_lightning_checkpoint_is_exported(trained_run, tmp_path):
    stored = torch.load(trained_run / "checkpoints" / "step-000000002.ckpt", map_location="cpu", weights_only=True)
    del stored["ema"]  # vdm's own entry; the other layouts an EMA may come in:
    net_weights = {k.removeprefix("net."): v for k, v in stored["state_dict"].items()}
    ema = {k: v * 0.5 for k, v in net_weights.items()}
    config = trained_run / "config.yaml"
    variants = {
        "entry": {**stored, "ema_state_dict": {f"net.{k}": v for k, v in ema.items()}},
        "submodule": {**stored, "state_dict": {**stored["state_dict"], **{f"ema.net.{k}": v for k, v in ema.items()}}},
        "averaged_model": {
            **stored,
            "state_dict": {
                **stored["state_dict"],
                "ema.n_averaged": torch.tensor(3),
                **{f"ema.module.{k}": v for k, v in ema.items()},
            },
        },
    }
    for name, checkpoint in variants.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save(checkpoint, path)
        summary = export(path, tmp_path / f"{name}.safetensors", config)
        assert summary["ema"], name
        assert_equal_state(read_weights_file(tmp_path / f"{name}.safetensors")[1], net_weights)
        assert_equal_state(read_weights_file(tmp_path / f"{name}.safetensors", ema=True)[1], ema)
    assert not export(tmp_path / "entry.ckpt", tmp_path / "no_ema.safetensors", config, ema=False)["ema"]

    partial = {**stored, "ema_state_dict": dict(list(ema.items())[:3])}
    torch.save(partial, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="EMA does not cover"):
        export(tmp_path / "partial.ckpt", tmp_path / "x.safetensors", config)


@pytest.mark.slow
def test_a_checkpoint_holding_objects_is_read_by_full_unpickling(trained_run, tmp_path, capsys):
    import argparse

    stored = torch.load(trained_run / "checkpoints" / "step-000000002.ckpt", map_location="cpu", weights_only=True)
    path = tmp_path / "objects.ckpt"
    torch.save({**stored, "hyper_parameters": argparse.Namespace(lr=1.0)}, path)  # weights_only=True refuses it
    summary = export(path, tmp_path / "m.safetensors", trained_run / "config.yaml")
    assert summary["read"] == "torch.load(weights_only=False)" and "weights_only=False" in capsys.readouterr().err
    assert_equal_state(
        read_weights_file(tmp_path / "m.safetensors")[1], {k[4:]: v for k, v in stored["state_dict"].items()}
    )


@pytest.mark.slow
def test_export_casts_and_refuses_what_does_not_fit(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "step-000000002.ckpt"
    summary = export(checkpoint, tmp_path / "bf16.safetensors", dtype="bfloat16")
    assert summary["dtypes"] == ["bfloat16"]
    assert all(p.dtype == torch.bfloat16 for p in build_from_weights(tmp_path / "bf16.safetensors").parameters())

    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    cases = {
        "depth": ({**config, "model": {**config["model"], "depth": 2}}, "do not fit the model config"),
        "channels": (
            {**config, "model": {**config["model"], "in_channels": 4}},
            "in_channels: the weights say 3, model.in_channels",
        ),
        "text": (
            {**config, "model": {**config["model"], "text_dim": 512}},
            "text_dim: the weights say 64, model.text_dim .* says 512",
        ),
        "target": ({**config, "model": {**config["model"], "_target_": "os.system"}}, "only vdm.models.SpaceTimeDiT"),
    }
    for name, (bad, message) in cases.items():
        run_config_yaml(tmp_path / name, bad)
        with pytest.raises(CheckpointError, match=message):
            export(checkpoint, tmp_path / f"{name}.safetensors", tmp_path / name / "config.yaml")
        assert not (tmp_path / f"{name}.safetensors").exists()
    with pytest.raises(CheckpointError, match="--config"):
        export(checkpoint, tmp_path / "x.safetensors", tmp_path / "nowhere.yaml")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        export(checkpoint, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="neither a DeepSpeed checkpoint"):
        export(tmp_path, tmp_path / "x.safetensors", trained_run / "config.yaml")


@pytest.mark.slow
def test_command_line(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "step-000000002.ckpt"
    out = tmp_path / "m.safetensors"
    ok = subprocess.run(
        [sys.executable, "scripts/export.py", str(checkpoint), "--out", str(out), "--no-ema"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"wrote {out}") and "EMA:        no" in ok.stdout
    assert (
        main(
            [
                str(tmp_path / "none.ckpt"),
                "--out",
                str(tmp_path / "n.safetensors"),
                "--config",
                str(trained_run / "config.yaml"),
            ]
        )
        == 1
    )
    assert "export: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoint)])  # --out is required


def test_wrapper_prefixes_are_stripped_and_the_rest_left_out():
    t = torch.zeros(1)
    state = {
        "_forward_module.net.blocks.0.w": t,
        "module.net.final.b": t,
        "net._orig_mod.patch_embed.w": t,
        "net.blocks.1._fsdp_wrapped_module._checkpoint_wrapped_module.attn.w": t,
        "autoencoder.x": t,
        "_forward_module.ema.net.blocks.0.w": t,
        "ema.module.final.b": t,
        "ema.patch_embed.w": t,
        "ema.module.blocks.1.attn.w": t,
        "ema.n_averaged": torch.tensor(1),
    }
    found = network_weights(state)
    net, ema, ignored = found.net, found.ema, found.ignored
    assert set(net) == set(ema) == {"blocks.0.w", "final.b", "patch_embed.w", "blocks.1.attn.w"}
    assert ignored == ["autoencoder.x"]
    with pytest.raises(CheckpointError, match="no network weights"):
        network_weights({"model.w": t})


# ---------------------------------------------------------------- Lightning + DeepSpeed ZeRO / FSDP2 directories

STAGES = [1, 2, 3]
KINDS = [*(f"zero{stage}" for stage in STAGES), "fsdp2"]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    for kind in KINDS:
        run_config_yaml(out / kind, RUN_CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env |= {
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, __file__, "sharded", str(out), *KINDS]
    logs = [out / f"rank{rank}.log" for rank in range(2)]
    ranks = [
        subprocess.Popen(
            command, cwd=ROOT, env={**env, "LOCAL_RANK": str(rank)}, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        for rank, log in enumerate(logs)
    ]
    deadline = time.monotonic() + 300
    try:  # a rank that fails would leave the other waiting for it: stop at the first failure
        while any(rank.poll() is None for rank in ranks) and time.monotonic() < deadline:
            if any(rank.returncode not in (None, 0) for rank in ranks):
                break
            time.sleep(0.2)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    for rank, log in zip(ranks, logs):
        assert rank.returncode == 0, f"{log}: " + log.read_text()[-5000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_export_of_a_deepspeed_zero_checkpoint(stage, sharded_runs, tmp_path):
    run = sharded_runs / f"zero{stage}"
    checkpoint = run / "checkpoints" / STEP
    tag = checkpoint / "checkpoint"
    assert (checkpoint / "latest").read_text().strip() == "checkpoint"
    assert len(list(tag.glob("*_optim_states.pt"))) == 2  # partitioned over the 2 ranks
    model_states = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    raw = torch.load(tag / model_states, map_location="cpu", weights_only=False)
    assert all(k.startswith("net.") for k in raw["module"])  # Lightning >= 2.1 (older: _forward_module.net.)
    if stage == 3:
        assert all(v.numel() == 0 for v in raw["module"].values())  # parameters live only in the partitions

    reference = torch.load(run / "reference.pt", map_location="cpu", weights_only=True)
    out = tmp_path / "model.safetensors"
    summary = export(checkpoint, out)  # config from run/config.yaml
    assert "ZeRO checkpoint (2 ranks" in summary["layout"] and summary["step"] == 2
    assert summary["ema"]
    config, weights = read_weights_file(out)
    assert config == TINY
    assert_equal_state(weights, reference["net"])  # the trained fp32 weights, gathered over the ranks
    assert_equal_state(read_weights_file(out, ema=True)[1], reference["ema"])
    initial = {k: v * 2 for k, v in reference["ema"].items()}  # the stand-in EMA is half the initial weights
    assert sum(not torch.equal(weights[k], initial[k]) for k in weights) > len(weights) // 2  # training moved them
    computes(build_from_weights(out), text_dim=16, frames=2, size=4)
    # the tag folder itself is accepted, and gives the same weights
    assert_equal_state(read_weights_file(export(tag, tmp_path / "tag.safetensors")["out"])[1], weights)


@pytest.mark.slow
def test_export_of_an_fsdp2_distributed_checkpoint(sharded_runs, tmp_path):
    run = sharded_runs / "fsdp2"
    checkpoint = run / "checkpoints" / STEP
    assert (checkpoint / ".metadata").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2
    reference = torch.load(run / "reference.pt", map_location="cpu", weights_only=True)
    out = tmp_path / "model.safetensors"
    summary = export(checkpoint, out)
    assert summary["layout"].startswith("torch distributed checkpoint") and summary["step"] == 2 and summary["ema"]
    config, weights = read_weights_file(out)
    assert config == TINY
    assert_equal_state(weights, reference["net"])
    assert_equal_state(read_weights_file(out, ema=True)[1], reference["ema"])
    initial = {k: v * 2 for k, v in reference["ema"].items()}
    assert sum(not torch.equal(weights[k], initial[k]) for k in weights) > len(weights) // 2
    computes(build_from_weights(out), text_dim=16, frames=2, size=4)


if __name__ == "__main__" and sys.argv[1:2] == ["sharded"]:
    write_sharded_checkpoints(Path(sys.argv[2]), sys.argv[3:])
