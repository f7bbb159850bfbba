"""PixArt in diffusers' layout into vdm: the imported image model, and the video model inflated from it, compute
what diffusers' PixArtTransformer2DModel computes on every frame (fp32, <= 1e-5), given the same latents, text
features and mask, with vdm's time t = timestep / 1000."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import save_file

from scripts.import_weights import main, run
from tests.runs import train_two_steps
from vdm.models import load_weights
from vdm.types import TextCond

TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[2]

# depth, heads, patch, widths, learned sigma, interpolation scale: none of them the one the mapping was written on
CONFIGS = {
    "learned-sigma": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                          patch_size=2, caption_channels=24, sample_size=8),
    "patch-1-scale-2": dict(num_layers=3, num_attention_heads=4, attention_head_dim=4, in_channels=3, out_channels=3,
                            patch_size=1, caption_channels=10, sample_size=6, interpolation_scale=2),
    "patch-4-one-head": dict(num_layers=1, num_attention_heads=1, attention_head_dim=12, in_channels=4,
                             out_channels=8, patch_size=4, caption_channels=32, sample_size=16),
}  # fmt: skip


def pixart(config: dict, seed: int = 0) -> PixArtTransformer2DModel:
    """A small PixArt with every weight random (diffusers zero-initializes none of the ones that matter here, but a
    zero left anywhere could hide a wrong mapping)."""
    torch.manual_seed(seed)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    model = PixArtTransformer2DModel(**config, cross_attention_dim=width)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def inputs(config: dict, batch: int, height: int, width: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config["in_channels"], height, width, generator=generator)
    text = torch.randn(batch, 6, config["caption_channels"], generator=generator)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, 3:] = 0  # padding in the first caption only
    timesteps = torch.tensor([999.0, 500.0, 37.0, 0.0][:batch])
    return latents, text, mask, timesteps


def theirs(model: PixArtTransformer2DModel, latents, text, mask, timesteps) -> torch.Tensor:
    """diffusers' prediction (the mean half when it learns a variance), (B, C, H, W)."""
    with torch.no_grad():
        out = model(latents, encoder_hidden_states=text, timestep=timesteps, encoder_attention_mask=mask).sample
    return out[:, : latents.shape[1]]


def cond(text, mask) -> TextCond:
    return TextCond(text, mask.bool(), torch.zeros(text.shape[0], text.shape[-1]))  # PixArt reads no pooled text


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def imported(request, tmp_path_factory):
    """(config, diffusers model, vdm weights file) of each config, imported from a save_pretrained folder."""
    config = CONFIGS[request.param]
    model = pixart(config)
    folder = tmp_path_factory.mktemp(request.param) / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    summary = run("pixart", folder, folder.parent / "pixart.safetensors", {})
    return config, model, Path(summary["out"])


@pytest.mark.parametrize("size", ["square", "non-square"])
def test_the_imported_image_model_equals_diffusers(imported, size):
    config, model, weights = imported
    p, n = config["patch_size"], config["sample_size"]
    height, width = (n, n) if size == "square" else (n + 2 * p, n - p)  # the grid is recomputed off its base size
    latents, text, mask, timesteps = inputs(config, 3, height, width)
    net = load_weights(weights)
    assert not net.temporal
    with torch.no_grad():
        ours = net(latents[:, :, None], timesteps / 1000, cond(text, mask))[:, :, 0]
    expected = theirs(model, latents, text, mask, timesteps)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_the_inflated_video_model_equals_diffusers_on_every_frame(imported, frames):
    config, model, weights = imported
    n = config["sample_size"]
    latents, text, mask, timesteps = inputs(config, 2, n, n, seed=frames)
    clip = torch.randn(2, config["in_channels"], frames, n, n, generator=torch.Generator().manual_seed(frames))
    net = load_weights(weights, temporal=True)
    assert net.temporal
    with torch.no_grad():
        ours = net(clip, timesteps[:2] / 1000, cond(text, mask))  # (B, C, T, H, W)
    for frame in range(frames):
        expected = theirs(model, clip[:, :, frame], text, mask, timesteps[:2])
        assert (ours[:, :, frame] - expected).abs().max() <= TOLERANCE, f"frame {frame}"


def test_the_variance_half_is_never_trained(imported):
    """With learned sigma the output layer has PixArt's variance rows; vdm's forward returns the prediction only,
    so they get exactly zero gradient while the prediction's rows get some."""
    config, _, weights = imported
    net = load_weights(weights, temporal=True).train()
    c, p = config["in_channels"], config["patch_size"]
    assert net.learned_sigma == (config["out_channels"] == 2 * c)
    n = config["sample_size"]
    latents, text, mask, timesteps = inputs(config, 2, n, n)
    out = net(latents[:, :, None].repeat(1, 1, 2, 1, 1), timesteps[:2] / 1000, cond(text, mask))
    assert out.shape[1] == c
    out.square().mean().backward()
    rows = net.final.linear.weight.grad.reshape(p * p, net.out_channels, -1)  # rows are (ph pw c)
    assert rows[:, :c].abs().sum() > 0
    if net.learned_sigma:
        assert torch.equal(rows[:, c:], torch.zeros_like(rows[:, c:]))


def test_a_bare_safetensors_file_needs_heads_and_sample_size(tmp_path, capsys):
    config = CONFIGS["learned-sigma"]
    model = pixart(config)
    bare = tmp_path / "pixart-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))

    assert main(["--format", "pixart", "--src", str(bare), "--out", str(tmp_path / "a.safetensors")]) == 1
    assert "['num_attention_heads', 'sample_size']" in capsys.readouterr().err

    out = tmp_path / "b.safetensors"
    argv = ["--format", "pixart", "--src", str(bare), "--out", str(out), "--heads", "2", "--sample-size", "8"]
    assert main(argv) == 0
    assert "model.pooled_text=false" in capsys.readouterr().out
    latents, text, mask, timesteps = inputs(config, 2, 8, 8)
    with torch.no_grad():
        ours = load_weights(out)(latents[:, :, None], timesteps[:2] / 1000, cond(text, mask))[:, :, 0]
    assert (ours - theirs(model, latents, text, mask, timesteps[:2])).abs().max() <= TOLERANCE


def test_size_conditions_and_pickles_are_refused_by_name(tmp_path, capsys):
    config = {**CONFIGS["learned-sigma"], "use_additional_conditions": True}
    folder = tmp_path / "ms"
    pixart(config).save_pretrained(folder, safe_serialization=True)
    assert main(["--format", "pixart", "--src", str(folder), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "resolution_embedder" in capsys.readouterr().err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({}, pickled / "diffusion_pytorch_model.bin")
    assert main(["--format", "pixart", "--src", str(pickled), "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "pickles, never read here" in capsys.readouterr().err


def test_train_py_inflates_an_imported_pixart_and_checks_it_before_step_0(tmp_path):
    """The user's path: import, then `train.py init_from=...` with the printed overrides: the run's parity check
    passes and it trains (pixel space, so 3 channels; clip-tiny's 64-wide text as PixArt's caption features)."""
    config = dict(num_layers=2, num_attention_heads=4, attention_head_dim=16, in_channels=3, out_channels=6,
                  patch_size=4, caption_channels=64, sample_size=8)  # fmt: skip
    folder = tmp_path / "transformer"
    pixart(config).save_pretrained(folder, safe_serialization=True)
    imported = subprocess.run(
        [sys.executable, "scripts/import_weights.py", "--format", "pixart", "--src", str(folder),
         "--out", str(tmp_path / "pixart.safetensors")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    overrides = imported.stdout.split("model overrides for train.py: ")[1].split()
    overrides = [o for o in overrides if not o.startswith(("model.temporal=", "model.max_size="))]
    weights = tmp_path / "pixart.safetensors"
    quick = ("data.eval_clips=16", "sampling.steps=2")
    run = train_two_steps(tmp_path, f"init_from={weights}", "model.temporal=true", *overrides, *quick)
    report = json.loads((run / "inflation.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= TOLERANCE * report["parity"]["scale"]
    assert report["unused"] == [] and all("temporal" in name for name in report["created"])
