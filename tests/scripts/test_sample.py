"""scripts/sample.py: a real train.py run's checkpoint, or its exported weights file, becomes videos: every path
builds the same network and parts, and the same seed gives the same bytes (the run's own samples included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.export import export
from scripts.sample import main
from tests.runs import train_two_steps
from vdm.data.video import decode_frames, probe
from vdm.models import SpaceTimeDiT
from vdm.models.weights import read_weights_file, save_weights

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["the digit 3 moves left", "the digit 7 moves up"]
FRAMES, SIZE, STEPS = 8, 32, 3  # the run's data.num_frames, data.size and sampling.steps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread per process: on a machine shared with other work, two threads that wait on each other make a
    tiny network's forward many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 2-step run of train.py (defaults: dit_tiny, clip-tiny text encoder, identity autoencoder, flow)
    that samples PROMPTS at its end. No EMA: its samples are of the trained weights themselves."""
    return train_two_steps(
        tmp_path_factory.mktemp("runs"),
        "ema.enabled=false",
        "trainer.log_every_n_steps=1",
        "data.eval_shards=null",
        f"data.num_frames={FRAMES}",
        f"data.size={SIZE}",
        f"sampling.prompts=[{','.join(repr(p) for p in PROMPTS)}]",
        f"sampling.steps={STEPS}",
    )


def sample(*args: str | Path) -> int:
    return main([str(a) for a in args])


def prompt_args() -> list[str]:
    return [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]


def written(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def check_video(data: bytes, frames: int, height: int, width: int) -> None:
    info = probe(data)
    assert (info.width, info.height) == (width, height)
    decoded = decode_frames(data, range(frames))
    assert decoded.shape == (frames, height, width, 3)
    with pytest.raises(Exception, match="frames"):
        decode_frames(data, [frames])  # exactly `frames` frames: one more is refused


@pytest.mark.slow
def test_from_a_run_directory_and_its_weights_file(trained_run, tmp_path):
    out = tmp_path / "run"
    assert sample("--run", trained_run, *prompt_args(), "--out", out, "--seed", "0") == 0
    files = written(out)
    assert sorted(files) == sorted(["000.mp4", "000.gif", "001.mp4", "001.gif", "grid.mp4", "grid.gif", "prompts.txt"])
    assert files["prompts.txt"].decode().splitlines() == PROMPTS
    for name in ("000.mp4", "000.gif", "001.mp4", "001.gif"):
        check_video(files[name], FRAMES, SIZE, SIZE)
    check_video(files["grid.mp4"], FRAMES, SIZE, 2 * SIZE + 2)  # two clips side by side, 2 pixels apart
    clips = [decode_frames(files[f"00{i}.gif"], range(FRAMES)) for i in range(2)]
    assert not (clips[0] == clips[1]).all()  # two prompts, two videos

    # the same seed, the same bytes; another seed, another video
    assert sample("--run", trained_run, *prompt_args(), "--out", tmp_path / "again", "--seed", "0") == 0
    assert written(tmp_path / "again") == files
    assert sample("--run", trained_run, *prompt_args(), "--out", tmp_path / "seed1", "--seed", "1") == 0
    assert written(tmp_path / "seed1")["000.mp4"] != files["000.mp4"]

    # the exported weights build the same network: with the run's config, and with the project's defaults
    # (which are what the run was trained with)
    weights = tmp_path / "model.safetensors"
    export(trained_run / "checkpoints" / "step-000000002.ckpt", weights)
    config = trained_run / "config.yaml"
    assert sample("--weights", weights, "--config", config, *prompt_args(), "--out", tmp_path / "w", "--seed", "0") == 0
    assert written(tmp_path / "w") == files
    defaults = ["--out", tmp_path / "defaults", "--seed", "0", "--steps", str(STEPS)]  # the defaults say 25 steps
    assert sample("--weights", weights, *prompt_args(), *defaults) == 0
    assert written(tmp_path / "defaults") == files


@pytest.mark.slow
def test_reproduces_the_runs_own_samples(trained_run, tmp_path):
    # the run sampled PROMPTS at its end with its sampling settings into a 4-column grid, 4x upscaled
    assert sample("--run", trained_run, *prompt_args(), "--out", tmp_path, "--columns", "4", "--upscale", "4") == 0
    assert (tmp_path / "grid.mp4").read_bytes() == (trained_run / "samples" / "step-000000002.mp4").read_bytes()


@pytest.mark.slow
def test_ema_weights_and_the_command_line(trained_run, tmp_path):
    export(trained_run / "checkpoints" / "step-000000002.ckpt", tmp_path / "plain.safetensors")
    config, weights = read_weights_file(tmp_path / "plain.safetensors")
    ema = {name: tensor * 0.5 for name, tensor in weights.items()}
    save_weights(tmp_path / "with_ema.safetensors", weights, config, ema_state_dict=ema)
    save_weights(tmp_path / "ema_only.safetensors", ema, config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")

    for name, extra in (("ema", ["--ema"]), ("raw", []), ("ema_only", [])):
        source = tmp_path / ("ema_only.safetensors" if name == "ema_only" else "with_ema.safetensors")
        assert sample("--weights", source, "--prompts-file", prompts, "--out", tmp_path / name, *extra) == 0
    # --ema samples the file's ema.* tensors: the same videos as a file holding them as its weights
    assert written(tmp_path / "ema") == written(tmp_path / "ema_only") != written(tmp_path / "raw")
    assert sample("--weights", tmp_path / "plain.safetensors", *prompt_args(), "--out", tmp_path / "x", "--ema") == 1
    assert sample("--run", trained_run, *prompt_args(), "--out", tmp_path / "x", "--ema") == 1  # no EMA in the run

    # as a script, with the sizes and the batches given: 16 frames of 16x16, one prompt per batch
    result = subprocess.run(
        [
            sys.executable,
            "scripts/sample.py",
            "--run",
            str(trained_run),
            "--prompts-file",
            str(prompts),
            "--out",
            str(tmp_path / "cli"),
            "--frames",
            "16",
            "--size",
            "16",
            "--steps",
            "2",
            "--batch-size",
            "1",
        ],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampled 2 prompt(s), 16 frames of 16x16" in result.stdout
    check_video((tmp_path / "cli" / "001.mp4").read_bytes(), 16, 16, 16)
    # batch k draws from seed + k: the second prompt alone with seed 1 is the second file
    args = ["--frames", "16", "--size", "16", "--steps", "2", "--out", tmp_path / "one", "--seed", "1"]
    assert sample("--run", trained_run, "--prompt", PROMPTS[1], *args) == 0
    assert (tmp_path / "one" / "000.mp4").read_bytes() == (tmp_path / "cli" / "001.mp4").read_bytes()


def test_refusals(tmp_path, capsys):
    config = dict(in_channels=3, text_dim=32, width=32, depth=1, heads=2, patch_size=[1, 2, 2])
    weights = save_weights(tmp_path / "m.safetensors", SpaceTimeDiT(**config).state_dict(), config)
    out = ["--out", str(tmp_path / "out")]
    assert sample("--weights", weights, *out) == 1
    assert "no prompts" in capsys.readouterr().err
    # the default text encoder (clip-tiny) is 64 wide: these weights need their run's config
    assert sample("--weights", weights, "--prompt", "a", *out) == 1
    assert "text_dim=32: pass the config" in capsys.readouterr().err
    assert sample("--run", tmp_path, "--prompt", "a", *out) == 1
    assert "no run config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample("--run", tmp_path, "--weights", weights, "--prompt", "a", *out)  # one source only
    assert not (tmp_path / "out").exists()
