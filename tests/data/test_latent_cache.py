"""Latent caches (vdm/data/cache.py, vdm/latent_cache.py, scripts/precompute.py): what a cache holds is what the
autoencoder and the text encoder give; training from it is training on the fly; a cache made otherwise is refused;
a killed precompute resumes to the same bytes."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load as load_tensors

from scripts import precompute
from tests.data.test_pipeline import image_members, make_shards
from tests.runs import ROOT, succeeded, train_env, train_losses
from train import assemble
from vdm.autoencoders.diffusers_vae import KLAutoencoder
from vdm.command_line import build, compose_config
from vdm.config_check import ConfigError
from vdm.data import VideoData
from vdm.data.cache import Cache, CachedClipMaker
from vdm.data.shard_writer import write_shard
from vdm.data.shards import iter_shard_samples
from vdm.latent_cache import Precompute, cache_key, plan, start_cache

BUNDLED = ROOT / "data" / "moving_digits"
KL = ["autoencoder=kl_tiny"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """data.* overrides for a small copy of the bundled data: 4 training shards of 12 clips, 8 held-out clips."""
    root = tmp_path_factory.mktemp("shards")
    for index in range(4):
        samples = iter_shard_samples(str(BUNDLED / f"train-{index:06d}.tar.gz"))
        write_shard(root / f"train-{index:06d}.tar", [sample_members(next(samples)) for _ in range(12)])
    samples = iter_shard_samples(str(BUNDLED / "eval-000000.tar.gz"))
    write_shard(root / "eval-000000.tar", [sample_members(next(samples)) for _ in range(8)])
    return [f"data.train_shards='{root}/train-{{000000..000003}}.tar'", f"data.eval_shards={root}/eval-000000.tar"]


def sample_members(sample: dict) -> tuple[str, dict]:
    return sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def make_cache(out: Path, overrides: list[str], *flags: str) -> dict:
    return precompute.main(["--out", str(out), "--no-progress", *flags, *overrides])


@pytest.fixture(scope="module")
def fp32_cache(tmp_path_factory, shards) -> Path:
    out = tmp_path_factory.mktemp("cache") / "fp32"
    make_cache(out, [*shards, *KL], "--dtype", "float32")
    return out


def cached_samples(path: Path) -> list[dict]:
    return list(iter_shard_samples(str(path)))


def test_a_cache_holds_the_autoencoders_latents_and_the_text_encoders_features(fp32_cache, shards):
    config = compose_config([*shards, *KL])
    data, autoencoder, text = build(config, "data"), build(config, "autoencoder"), build(config, "text")
    centred = data.clip_maker(train=False)
    source = list(iter_shard_samples(data.train_sources[0].shards[0]))
    cached = cached_samples(fp32_cache / "train-s0-000000.tar")
    assert [s["__key__"] for s in cached] == [s["__key__"] for s in source]  # every clip once, in order
    for raw, entry in zip(source[:3], cached[:3]):
        tensors = load_tensors(entry["safetensors"])
        _, clip = centred(raw, np.random.default_rng(0))
        pixels = clip["video"][None].float() / 127.5 - 1.0
        torch.testing.assert_close(tensors["latent"][0], autoencoder.encode(pixels)[0], atol=1e-5, rtol=1e-5)
        cond = text.encode([clip["caption"]])
        n = int(cond.mask[0].sum())
        assert tensors["mask"].all() and tensors["mask"].shape == (n,)  # the real tokens, no padding
        torch.testing.assert_close(tensors["tokens"], cond.tokens[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tensors["pooled"], cond.pooled[0], atol=1e-5, rtol=1e-5)
        assert entry["txt"].decode() == clip["caption"]
    report = Cache.open(fp32_cache).reports()
    assert sum(r["clips"] for r in report) == 4 * 12 + 8 and all(not r["skipped"] for r in report)


def test_views_are_fixed_crops_view_zero_the_held_out_one_and_training_draws_one_per_clip(tmp_path, shards):
    out = tmp_path / "views"
    summary = make_cache(out, [*shards, *KL, "data.size=24"], "--views", "3", "--dtype", "float16")
    assert summary["complete"] and summary["views"] == 3
    entry = cached_samples(out / "train-s0-000000.tar")[0]
    latent = load_tensors(entry["safetensors"])["latent"]  # (V, c, t, h, w)
    assert latent.shape[0] == 3 and latent.dtype == torch.float16
    assert not torch.equal(latent[0], latent[1]) or not torch.equal(latent[0], latent[2])  # other starts and crops
    assert load_tensors(cached_samples(out / "eval-000000.tar")[0]["safetensors"])["latent"].shape[0] == 1
    digest = Cache.open(out).digest
    trained = CachedClipMaker([], digest, train=True)
    views = []
    for seed in range(12):  # the view is drawn from the clip's own stream (seed, rank, worker, ordinal)
        view = int(np.random.default_rng(seed).integers(3))
        assert torch.equal(trained(entry, np.random.default_rng(seed))[1]["latent"], latent[view])
        views.append(view)
    assert set(views) == {0, 1, 2}
    held_out = CachedClipMaker([], digest, train=False)
    assert all(torch.equal(held_out(entry, np.random.default_rng(i))[1]["latent"], latent[0]) for i in range(5))


def run(name: str, root: Path, *overrides: str) -> Path:
    args = [
        *(f"name={name}", f"run_root={root}", "logger=none", "evaluation=none", "trainer.progress_bar=false"),
        *("trainer.log_every_n_steps=1", "trainer.eval_every_n_steps=2", "trainer.checkpoint_every_n_steps=0"),
        *("data.batch_size=4", "data.num_workers=0", "data.eval_clips=8", "trainer.caption_dropout=0.5"),
        *overrides,
    ]
    env = train_env(OMP_NUM_THREADS="1")
    succeeded(subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True))
    return root / name


def held_out(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return [float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")]


def test_training_from_the_cache_is_training_on_the_fly_and_resumes_exactly(tmp_path, shards, fp32_cache):
    common = [*shards, *KL, "trainer.max_steps=4"]
    # the cache keeps view 0 (first frame, centred crop): the on-the-fly run takes the same clips
    fly = run("fly", tmp_path, *common, "data.random_crop=false", "data.random_start=false")
    cached = run("cached", tmp_path, *common, f"data.cache={fp32_cache}", "trainer.checkpoint_every_n_steps=2")
    expected, losses = train_losses(fly), train_losses(cached)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in expected:  # float32 latents: the same numbers, up to the VAE's batching
        assert losses[step] == pytest.approx(expected[step], rel=1e-4), step
    assert held_out(cached) == pytest.approx(held_out(fly), rel=1e-4) and len(held_out(fly)) == 3
    # started again from its step-2 checkpoint: the steps after are the uninterrupted run's
    step_2 = cached / "checkpoints" / "step-000000002.ckpt"
    resumed = train_losses(run("resumed", tmp_path, *common, f"data.cache={fp32_cache}", f"resume={step_2}"))
    assert [resumed[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]


def test_a_half_precision_cache_is_the_float32_one_rounded(tmp_path, shards, fp32_cache):
    out = tmp_path / "bf16"
    make_cache(out, [*shards, *KL])  # bfloat16, the default
    for name in ("train-s0-000001.tar", "eval-000000.tar"):
        for low, full in zip(cached_samples(out / name), cached_samples(fp32_cache / name), strict=True):
            low, full = load_tensors(low["safetensors"]), load_tensors(full["safetensors"])
            assert low["latent"].dtype == torch.bfloat16 and torch.equal(low["mask"], full["mask"])
            for part in ("latent", "tokens", "pooled"):
                assert torch.equal(low[part], full[part].to(torch.bfloat16)), part


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("autoencoder.config.latent_channels=8", "autoencoder.config.latent_channels: 4 in the cache, 8 here"),
        ("text=t5_tiny", "text._target_: 'vdm.text.OpenCLIPTextEncoder' in the cache"),
        ("data.num_frames=4", "transforms.buckets[0][0]: 8 in the cache, 4 here"),
        ("text.seed=1", "text.seed: 0 in the cache, 1 here; text.weights_sha256"),
    ],
)
def test_a_cache_made_with_other_settings_is_refused_naming_what_differs(fp32_cache, shards, override, named):
    config = compose_config([*shards, *KL, f"data.cache={fp32_cache}", override])
    with pytest.raises(ConfigError, match="data.cache: ") as error:
        assemble(OmegaConf.create(config))
    assert named in str(error.value)


def test_an_incomplete_cache_is_refused_and_a_changed_source_shard_is_seen(tmp_path, shards, fp32_cache):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in fp32_cache.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "train-s0-000002.json").unlink()  # as if precompute was killed writing that shard
    with pytest.raises(ConfigError, match="not complete: 1 of 5 shards not written"):
        assemble(OmegaConf.create(compose_config([*shards, *KL, f"data.cache={copy}"])))
    source = Path(shards[1].split("=", 1)[1])
    grown = tmp_path / "eval-000000.tar"
    grown.write_bytes(source.read_bytes() + bytes(512))  # the held-out shard changed after the cache was made
    moved = [shards[0], f"data.eval_shards={grown}"]
    with pytest.raises(ConfigError, match=r"eval\[0\].size: \d+ in the cache, \d+ here"):
        assemble(OmegaConf.create(compose_config([*moved, *KL, f"data.cache={fp32_cache}"])))


def test_a_killed_precompute_resumes_without_losing_or_repeating_a_clip(tmp_path, shards, fp32_cache):
    parts = tmp_path / "parts"
    command = [sys.executable, "scripts/precompute.py", "--out", str(parts), "--no-progress", "--dtype", "float32"]
    child = subprocess.Popen([*command, *shards, *KL], cwd=ROOT, env=train_env(OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (parts / "train-s0-000000.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)  # in the middle of the next shard
    child.wait()
    done = sorted(p.name for p in parts.glob("*.json") if p.name != "cache.json")
    assert 1 <= len(done) < 5, done
    # the rest in two processes, each taking every other shard
    summary = make_cache(parts, [*shards, *KL], "--dtype", "float32", "--processes", "2")
    assert summary["complete"] and summary["this_run"]["shards"] == 5 - len(done)
    assert not list(parts.glob("*.partial"))
    tars = sorted(p.name for p in fp32_cache.glob("*.tar"))
    assert tars == sorted(p.name for p in parts.glob("*.tar")) and len(tars) == 5
    for name in tars:  # every clip once, in order, as the uninterrupted one-process cache has it
        resumed, whole = cached_samples(parts / name), cached_samples(fp32_cache / name)
        assert [(s["__key__"], s["txt"], s["json"]) for s in resumed] == [
            (s["__key__"], s["txt"], s["json"]) for s in whole
        ]
        for a, b in zip(resumed, whole):
            a, b = load_tensors(a["safetensors"]), load_tensors(b["safetensors"])
            for part in ("latent", "tokens", "pooled"):  # up to the threads' order of float sums
                torch.testing.assert_close(a[part], b[part], atol=1e-5, rtol=1e-5)


def test_a_cache_of_a_mixture_with_images_streams_the_same_batches_as_its_sources(tmp_path):
    videos = make_shards(tmp_path / "raw", "v", 2, 10)  # 12-frame 16x16 grey ramps
    stills = make_shards(tmp_path / "raw", "i", 2, 10, members=image_members)
    settings = dict(
        sources=[{"shards": videos, "weight": 3.0}, {"shards": stills, "weight": 1.0}],
        num_frames=4,
        size=16,
        batch_size=3,
        image_batch_size=2,
        num_workers=0,
        shuffle_buffer=6,
        random_crop=False,
        random_start=False,
    )
    config = compose_config(KL)
    autoencoder, text = build(config, "autoencoder"), build(config, "text")
    assert isinstance(autoencoder, KLAutoencoder)
    raw = VideoData(**settings)
    key = cache_key(raw, config["autoencoder"], autoencoder, config["text"], text)
    cache = start_cache(tmp_path / "cache", key, views=1, dtype="float32")
    Precompute(raw, autoencoder, text, cache).run(plan(raw, cache.root, views=1))
    cached = VideoData(**settings, cache=str(tmp_path / "cache"))
    cached.latent_cache.check(key)
    stream, fly = iter(cached.train_loader(seed=3)), iter(raw.train_loader(seed=3))
    frames = set()
    for _ in range(12):  # more than an epoch of each source: mixing, shuffling and epochs as the sources'
        batch, expected = next(stream), next(fly)
        assert batch.keys == expected.keys and batch.captions == expected.captions
        latents = autoencoder.encode(expected.pixels())
        torch.testing.assert_close(batch.latents, latents, atol=1e-5, rtol=1e-5)
        frames.add(batch.latents.shape[2])
    assert frames == {4, 1}  # video clips and one-frame images, each in its own bucket
