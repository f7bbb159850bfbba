"""Weights files: one .safetensors with the network, its EMA and the config that rebuilds it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vdm.models import SpaceTimeDiT
from vdm.models.weights import CONFIG_KEY, build_from_weights, has_ema, load_into, read_weights_file, save_weights
from vdm.types import TextCond

C, DT = 3, 16
CONFIG = dict(in_channels=C, text_dim=DT, width=32, depth=2, heads=2, patch_size=[1, 2, 2])


def make(seed: int = 0, **overrides) -> SpaceTimeDiT:
    torch.manual_seed(seed)
    net = SpaceTimeDiT(**{**CONFIG, **overrides})
    with torch.no_grad():  # a fresh model is all zero gates; random weights make every tensor count
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return net


def inputs(batch: int = 2, T: int = 4, H: int = 8, W: int = 8, L: int = 5):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[0, 3:] = False
    cond = TextCond(torch.randn(batch, L, DT, generator=g), mask, torch.randn(batch, DT, generator=g))
    return torch.randn(batch, C, T, H, W, generator=g), torch.rand(batch, generator=g), cond


def assert_equal_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_is_exact_and_keeps_the_config(tmp_path):
    net = make()
    path = save_weights(tmp_path / "m.safetensors", net.state_dict(), CONFIG)
    config, state = read_weights_file(path)
    assert config == CONFIG
    assert_equal_state(state, net.state_dict())
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        assert json.loads(metadata[CONFIG_KEY]) == CONFIG and metadata["format"] == "pt"
        assert not any(k.startswith("ema.") for k in file.keys())
    assert not has_ema(path)
    with pytest.raises(ValueError, match="no EMA"):
        read_weights_file(path, ema=True)


def test_built_model_computes_exactly_what_the_original_did(tmp_path):
    net = make().eval()
    path = save_weights(tmp_path / "m.safetensors", net.state_dict(), CONFIG)
    built = build_from_weights(path)
    assert isinstance(built, SpaceTimeDiT) and not built.training
    assert all(p.device.type == "cpu" for p in built.parameters())
    assert_equal_state(built.state_dict(), net.state_dict())
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(built(x, t, cond), net(x, t, cond))


def test_ema_is_stored_beside_the_weights(tmp_path):
    net, ema = make(seed=0), make(seed=1)
    path = save_weights(tmp_path / "m.safetensors", net.state_dict(), CONFIG, ema_state_dict=ema.state_dict())
    assert has_ema(path)
    with safe_open(str(path), framework="pt") as file:
        names = set(file.keys())
    assert names == set(net.state_dict()) | {f"ema.{k}" for k in net.state_dict()}
    assert_equal_state(read_weights_file(path)[1], net.state_dict())
    assert_equal_state(read_weights_file(path, ema=True)[1], ema.state_dict())
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(build_from_weights(path, ema=True)(x, t, cond), ema.eval()(x, t, cond))
    with pytest.raises(ValueError, match="names and shapes"):
        save_weights(tmp_path / "bad.safetensors", net.state_dict(), CONFIG, ema_state_dict={"x": torch.zeros(1)})


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path):
    flat = torch.arange(12.0)  # views into one buffer, as zero_to_fp32 returns them
    state = {"a": flat[:6].view(2, 3), "b": flat[6:].view(3, 2).t(), "c": flat[:6].view(2, 3)}
    path = save_weights(tmp_path / "s.safetensors", state, CONFIG)
    _, loaded = read_weights_file(path)
    assert_equal_state(loaded, {k: v.contiguous() for k, v in state.items()})


def test_only_safetensors_are_read(tmp_path):
    pickled = tmp_path / "m.ckpt"
    torch.save(make().state_dict(), pickled)
    for call in (read_weights_file, build_from_weights, lambda path: load_into(make(), path)):
        with pytest.raises(ValueError, match=r"\.safetensors"):
            call(pickled)
    disguised = tmp_path / "pickle.safetensors"  # a pickle under the right name is still not read
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(ValueError, match="not a readable"):
        read_weights_file(disguised)
    plain = tmp_path / "plain.safetensors"  # safetensors without a vdm config
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a vdm weights file"):
        read_weights_file(plain)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_weights(tmp_path / "m.pt", make().state_dict(), CONFIG)
    with pytest.raises(ValueError, match="JSON"):
        save_weights(tmp_path / "m.safetensors", make().state_dict(), {**CONFIG, "width": torch.tensor(1)})
    with pytest.raises(ValueError, match="not SpaceTimeDiT arguments"):
        save_weights(tmp_path / "m.safetensors", make().state_dict(), {**CONFIG, "_target_": "x"})


def test_load_into_strict_copies_everything(tmp_path):
    source, target = make(seed=0), make(seed=1)
    path = save_weights(tmp_path / "m.safetensors", source.state_dict(), CONFIG)
    report = load_into(target, path)
    assert report.missing == [] and report.unexpected == [] and set(report.loaded) == set(source.state_dict())
    assert report.config == CONFIG
    assert_equal_state(target.state_dict(), source.state_dict())


def test_image_model_inflates_into_video_model(tmp_path):
    image = make(seed=0, temporal=False)
    path = save_weights(tmp_path / "image.safetensors", image.state_dict(), {**CONFIG, "temporal": False})
    video = SpaceTimeDiT(**CONFIG)  # fresh init: temporal gates are zero
    before = {k: v.clone() for k, v in video.state_dict().items()}
    temporal = sorted(set(video.state_dict()) - set(image.state_dict()))
    assert temporal and all("temporal" in k for k in temporal)

    with pytest.raises(ValueError, match="strict") as error:
        load_into(video, path)
    assert temporal[0] in str(error.value) and f"and {len(temporal) - 10} more" in str(error.value)
    assert_equal_state(video.state_dict(), before)  # a refused load changes nothing

    report = load_into(video, path, strict=False)
    assert report.missing == temporal and report.unexpected == []
    assert set(report.loaded) == set(image.state_dict())
    for k, v in video.state_dict().items():
        assert torch.equal(v, before[k] if k in temporal else image.state_dict()[k]), k
    x, t, cond = inputs()
    with torch.no_grad():  # temporal layers start silent: the video model is the image model
        torch.testing.assert_close(video.eval()(x, t, cond), image.eval()(x, t, cond))

    # the other way round: a video model's weights into an image model leave its temporal keys unused
    video_path = save_weights(tmp_path / "video.safetensors", make().state_dict(), CONFIG)
    assert load_into(SpaceTimeDiT(**{**CONFIG, "temporal": False}), video_path, strict=False).unexpected == temporal


def test_shape_mismatch_is_refused_naming_the_key(tmp_path):
    path = save_weights(tmp_path / "m.safetensors", make().state_dict(), CONFIG)
    wider = SpaceTimeDiT(**{**CONFIG, "in_channels": 4})
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight: file \(32, 3, 1, 2, 2\) vs network"):
            load_into(wider, path, strict=strict)
    assert_equal_state(wider.state_dict(), before)


def test_weights_load_into_other_dtypes_and_keep_their_own(tmp_path):
    net = make()
    half = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    path = save_weights(tmp_path / "bf16.safetensors", half, CONFIG)
    assert all(p.dtype == torch.bfloat16 for p in build_from_weights(path).parameters())
    target = make(seed=3)
    load_into(target, path)
    assert all(p.dtype == torch.float32 for p in target.parameters())
    assert_equal_state(target.state_dict(), {k: v.float() for k, v in half.items()})
