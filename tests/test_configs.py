"""Every config option composes, checks and builds; a bad key or value is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from vdm.config_check import ConfigError, check_config
from vdm.run_checks import check_global_batch

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_group_has_options():
    assert {"model", "diffusion", "text", "autoencoder", "data", "optim", "trainer", "logger", "sampling"} <= set(
        GROUPS
    )


def local_t5(folder: Path) -> list[str]:
    """A small T5 encoder folder, as transformers writes one, for a preset that loads one from disk."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=4)).save_pretrained(
        folder
    )
    ByT5Tokenizer().save_pretrained(folder)
    return [f"text.path={folder}"]


def local_vae(kind: str):
    """A small diffusers VAE folder of `kind` (kl_tiny's or wan_tiny's config), for a preset that loads one."""

    def write(folder: Path) -> list[str]:
        import yaml
        from diffusers import AutoencoderKL, AutoencoderKLWan

        config = yaml.safe_load((CONF / "autoencoder" / f"{kind}_tiny.yaml").read_text())["config"]
        (AutoencoderKL if kind == "kl" else AutoencoderKLWan)(**config).save_pretrained(folder)
        return [f"autoencoder.path={folder}"] + (["data.num_frames=9", "data.frame_stride=1"] if kind == "wan" else [])

    return write


REQUIRED = {  # presets with a value the user must give (`???`)
    ("text", "t5_xxl"): local_t5,
    ("autoencoder", "kl"): local_vae("kl"),
    ("autoencoder", "wan"): local_vae("wan"),
}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_checks_and_builds(group, option, tmp_path):
    given = REQUIRED[(group, option)](tmp_path / "given") if (group, option) in REQUIRED else []
    cfg = compose_config(f"{group}={option}", *given)
    config = OmegaConf.to_container(cfg, resolve=True)
    check_config({k: config[k] for k in train.SECTIONS}, supplied={"model": {"in_channels", "text_dim"}})
    if group == "experiment":  # a recipe over the sections: what it sets is checked above, each section builds
        assert all(train.build(cfg, section) is not None for section in train.SECTIONS[3:] if section != "model")
    elif group == "model":
        # large presets are built on the meta device: shapes and checks, no memory
        with torch.device("meta"):
            net = train.build(cfg, "model", in_channels=3, text_dim=64)
        assert isinstance(net, torch.nn.Module)
    else:
        assert train.build(cfg, group) is not None


def test_default_config_assembles_into_compatible_parts():
    parts = train.assemble(compose_config())
    assert parts.net.in_channels == parts.autoencoder.latent_channels
    assert parts.net.text_dim == parts.text_encoder.dim
    assert parts.data.num_frames == 8 and parts.data.size == 32


def test_xl_preset_is_about_700m_parameters():
    with torch.device("meta"):
        net = train.build(compose_config("model=dit_xl"), "model", in_channels=4, text_dim=1024)
    assert 650e6 < sum(p.numel() for p in net.parameters()) < 800e6


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+model.widht=64"], "model.widht"),  # a typo'd key in a config file
        (["model.width=abc"], "model.width"),  # wrong type
        (["data.num_frames=0"], "num_frames"),  # a value its constructor refuses
        (["optim.lr=-1"], "lr"),
        (["trainer.precision=fp8"], "precision"),
        (["model.heads=3"], "heads"),  # 128 is not divisible by 3
        (["data.size=30"], "data"),  # not divisible by the patch
        (["data.image_batch_size=8", "model.patch_size=[2,4,4]"], "data.image_batch_size"),  # 1 frame, patch of 2
        (["data.train_shards='/nonexistent/x-{0..3}.tar'"], "data"),
        (["seed=abc"], "seed"),
        (["trainer.global_batch_size=17"], "trainer.global_batch_size"),  # 8 x 1 x 1
        (["strategy=deepspeed_zero2", "strategy.stage=4"], "stage"),
        (["init_from=weights.pt"], "init_from"),  # no such file
        (["init_parity_tolerance=-1"], "init_parity_tolerance"),
        (["init_parity_check=maybe"], "init_parity_check"),
        (["resume=/nonexistent.ckpt"], "resume"),
        (["text=t5_xxl"], "text.path: a value is required"),
        (
            ["data.buckets=[{frames: 8, height: 32, width: 32, batch_sise: 4}]"],
            r"data: buckets\[0\]: unknown key 'batch_sise'",
        ),
        (["data.buckets=[{frames: 8, height: 32, batch_size: 4}]"], r"buckets\[0\]: missing width"),
        (
            ["data.buckets=[{frames: 8, height: 32, width: 32, batch_size: 4}]", "data.image_batch_size=8"],
            "image_batch_size",
        ),
        (
            [
                "data.buckets=[{frames: 8, height: 32, width: 32, batch_size: 4},{frames: 8, height: 16, width: 32, "
                "batch_size: 8}]",
                "trainer.global_batch_size=4",
            ],
            r"trainer.global_batch_size: 4 != data.buckets\[1\].batch_size 8",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train.assemble(compose_config(*overrides))


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_an_ema_is_kept_where_the_parameters_are_sharded(strategy):
    # each rank keeps the EMA of its own shard (vdm.distributed.shards; tests/distributed/test_strategies.py)
    parts = train.assemble(compose_config(f"strategy={strategy}"))
    assert parts.strategy.shards_parameters and parts.ema.enabled


def test_unknown_command_line_key_is_refused_by_name():
    with pytest.raises(Exception, match="num_frame"):
        compose_config("data.num_frame=8")


def test_config_check_types():
    node = {"_target_": "vdm.training.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.99], "warmup_steps": 10}
    check_config({"optim": node})
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: expected int"):
        check_config({"optim": node | {"warmup_steps": 1.5}})
    with pytest.raises(ConfigError, match=r"optim\.betas"):
        check_config({"optim": node | {"betas": [0.9]}})
    with pytest.raises(ConfigError, match=r"optim\._target_: cannot import"):
        check_config({"optim": {"_target_": "vdm.training.optim.Nope"}})
    with pytest.raises(ConfigError, match=r"model\.width: required"):
        check_config(
            {"model": {"_target_": "vdm.models.SpaceTimeDiT", "depth": 1, "heads": 1}},
            supplied={"model": {"in_channels", "text_dim"}},
        )


def test_global_batch_is_micro_batch_times_accumulation_times_processes():
    parts = train.assemble(
        compose_config(
            "data.batch_size=4",
            "trainer.accumulate_grad_batches=3",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.num_nodes=2",
            "trainer.global_batch_size=48",
        )
    )
    assert check_global_batch(parts.trainer, parts.data) == 48


def test_with_buckets_the_clip_shape_and_batch_follow_the_first_video_bucket():
    buckets = "[{frames: 1, height: 32, width: 32, batch_size: 16},{frames: 4, height: 16, width: 32, batch_size: 2}]"
    parts = train.assemble(compose_config(f"data.buckets={buckets}", "data.batch_size=8", "data.num_frames=8"))
    data = parts.data
    assert (data.num_frames, data.batch_size, data.sample_size) == (4, 2, (16, 32))  # not the ignored 8 and 8
    assert check_global_batch(parts.trainer, data) == 2
