"""`python train.py ...` end to end, through the command line, on the bundled data."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.runs import image_weights, run_train, train_losses
from vdm.models import SpaceTimeDiT
from vdm.models.param_groups import is_temporal
from vdm.models.weights import read_weights_file, save_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "logger.mode=offline",
    "data.batch_size=4",
    "data.eval_clips=8",
    "data.shuffle_buffer=16",
    "trainer.log_every_n_steps=2",
    "trainer.eval_every_n_steps=3",
    "trainer.checkpoint_every_n_steps=3",
    "trainer.progress_bar=false",
    "sampling.steps=2",
    "sampling.prompts=[the digit 1 moves up,the digit 7 moves left]",
]


TINY_NO_WANDB = [arg for arg in TINY if not arg.startswith("logger.")] + ["logger=none"]


train = run_train


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_train_writes_the_run_directory_then_resumes_it(tmp_path):
    run = tmp_path / "e2e"
    # a CPU has no peak FLOP/s of its own to look up: given one, the run logs MFU against it
    first = train(
        f"run_root={tmp_path}", "name=e2e", "trainer.max_steps=6", "trainer.peak_flops_per_device=1e12", *TINY
    )
    assert first.returncode == 0, first.stderr[-3000:]

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["name"] == "e2e" and config["trainer"]["max_steps"] == 6  # resolved, overrides applied
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000000003.ckpt", "step-000000006.ckpt"]

    rows = metric_rows(run)
    assert {"step", "train/loss", "val/loss", "lr", "grad_norm", "clips_per_sec"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [0, 2, 3, 4, 6]
    trained = [r for r in rows if r["train/loss"]]
    assert all(math.isfinite(float(r["train/loss"])) and float(r["clips_per_sec"]) > 0 for r in trained)
    assert all(float(r["grad_norm"]) > 0 for r in trained)
    assert all(0 < float(r["mfu"]) < 1 for r in trained)
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [0, 3, 6]
    # the Moving Digits evaluation (conf/evaluation/moving_digits.yaml) scores 80 generated clips at the end
    scored = [r for r in rows if r["eval/digit_acc"]]
    assert [int(r["step"]) for r in scored] == [6]
    assert all(0.0 <= float(scored[0][k]) <= 1.0 for k in ("eval/digit_acc", "eval/motion_acc"))
    assert "over 80 prompts" in first.stdout + first.stderr

    samples = run / "samples"
    assert (samples / "step-000000006.txt").read_text().splitlines() == [
        "the digit 1 moves up",
        "the digit 7 moves left",
    ]
    assert (samples / "step-000000006.mp4").stat().st_size > 0 and (samples / "step-000000006.gif").stat().st_size > 0

    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("run-*.wandb"))

    # the same command with a later max_steps continues the run from its latest checkpoint
    second = train(f"run_root={tmp_path}", "name=e2e", "trainer.max_steps=9", *TINY)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "resuming from" in output and "step-000000006.ckpt" in output
    steps = [int(r["step"]) for r in metric_rows(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 9  # one row per step, none repeated
    assert (run / "checkpoints" / "step-000000009.ckpt").exists()
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # same W&B run id, resumed
    assert len({p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}) == 1


def test_a_typo_on_the_command_line_is_a_config_error_with_status_2(tmp_path):
    """Hydra's own message and status 1 would break the promise of `config error: <key>` and status 2."""
    result = train(f"run_root={tmp_path}", "name=typo", "data.num_frame=8")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "config error: data.num_frame: no such key (a new key needs +data.num_frame=...)" in result.stderr
    assert not (tmp_path / "typo" / "checkpoints").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["model=dit_xxl"], "In 'config': Could not find 'model/dit_xxl' Available options in 'model': dit_b"),
        (["-m", "optim.lr=1e-3,2e-3", "data.num_frame=8"], "data.num_frame: no such key"),
        (["--cfg", "job", "trainer.max_step=3"], "trainer.max_step: no such key"),
        (["optim.lr=1e-3,2e-3"], "optim.lr=1e-3,2e-3: several values are a sweep, which needs -m (--multirun)"),
        (["model.width=["], "command line: "),
    ],
    ids=["unknown-option", "typo-in-a-sweep", "typo-after-a-flag", "sweep-without-m", "unparsable"],
)
def test_command_line_check_names_what_hydra_would_refuse(argv, message):
    from vdm.command_line import check_command_line
    from vdm.config_check import ConfigError

    with pytest.raises(ConfigError) as caught:
        check_command_line(argv)
    assert message in str(caught.value)
    check_command_line(["-m", "optim.lr=1e-3,2e-3", "model=dit_b", "--cfg", "job", "+data.extra=1"])  # all fine


def test_bad_value_stops_before_training_naming_the_key(tmp_path):
    result = train(f"run_root={tmp_path}", "name=bad", "model.width=abc")
    assert result.returncode == 2
    assert "config error: model.width: expected int" in result.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_cfg_job_prints_the_resolved_config():
    result = train("--cfg", "job", "model=dit_b", "data.num_frames=16")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["width"] == 768 and printed["data"]["num_frames"] == 16


@pytest.mark.slow
def test_a_run_killed_in_the_middle_of_a_save_resumes_exactly_like_an_uninterrupted_one(tmp_path):
    """SIGKILL while the step-6 checkpoint is being written: the same command resumes from step 3, drops the
    half-written file and ends with the losses, weights, optimizer and EMA of the uninterrupted run, bit for bit."""
    import signal
    import time

    import torch

    common = [
        f"run_root={tmp_path}",
        *TINY_NO_WANDB,
        "trainer.log_every_n_steps=1",
        "trainer.eval_every_n_steps=0",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.keep_last_checkpoints=5",
        "sampling.prompts=[]",
        "evaluation=none",
        "data.num_workers=1",
        "ema.decay=0.9",
    ]
    whole = train("name=whole", "trainer.max_steps=8", *common)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # The step-6 checkpoint is made a pipe as soon as the run has cleared stale partial saves (it writes its
    # config.yaml right after): writing it blocks half way, mid-save, until this test reads a little of it
    # and kills the writer. Step 3's save goes through untouched.
    checkpoints = tmp_path / "parts" / "checkpoints"
    args = [sys.executable, str(ROOT / "train.py"), "name=parts", "trainer.max_steps=8", *common]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "parts" / "config.yaml").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        pipe = checkpoints / "step-000000006.ckpt.partial"
        os.mkfifo(pipe)
        reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
        received = b""
        while len(received) < 4096:  # the writer is in the middle of the checkpoint
            assert process.poll() is None and time.monotonic() < deadline
            try:
                received += os.read(reader, 4096)
            except BlockingIOError:
                time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        os.close(reader)
    finally:
        process.kill()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000003.ckpt", "step-000000006.ckpt.partial"]

    resumed = train("name=parts", "trainer.max_steps=8", *common)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "step-000000006.ckpt.partial, a checkpoint whose save did not finish" in output
    assert "resuming from" in output and "step-000000003.ckpt" in output

    def losses(name):
        return {int(r["step"]): r["train/loss"] for r in metric_rows(tmp_path / name) if r["train/loss"]}

    assert losses("parts") == losses("whole") and len(losses("whole")) == 8

    def final(name):
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "step-000000008.ckpt", weights_only=False)
        optimizer = checkpoint["optimizer_states"][0]["state"]
        return {
            **{f"net.{k}": v for k, v in checkpoint["state_dict"].items()},
            **{f"ema.{k}": v for k, v in checkpoint["ema"]["weights"].items()},
            **{f"adam.{i}.{k}": v for i, state in optimizer.items() for k, v in state.items()},
        }

    final_whole, final_parts = final("whole"), final("parts")
    assert final_whole.keys() == final_parts.keys() and any(k.startswith("ema.") for k in final_whole)
    assert all(torch.equal(final_whole[k], final_parts[k]) for k in final_whole)


@pytest.mark.slow
def test_an_image_model_inflated_into_a_video_model_starts_where_it_ended(tmp_path):
    """An image run's weights (its checkpoint, or the weights file export writes from it) start a video run: the
    parity check passes, inflation.json lists every tensor, and at step 0 the video model's held-out loss is the
    image model's last. A video model one block deeper is refused by the parity check, even with init_strict=false.
    """
    # temporal patch 1 so the same patch embedding serves one-frame and multi-frame clips
    common = [
        f"run_root={tmp_path}",
        *TINY_NO_WANDB,
        "trainer.checkpoint_every_n_steps=0",
        "trainer.eval_every_n_steps=0",
        "model.patch_size=[1,4,4]",
        "sampling.prompts=[]",
        "evaluation=none",
    ]
    image = train("name=image", "trainer.max_steps=3", "model.temporal=false", *common)
    assert image.returncode == 0, image.stderr[-3000:]
    checkpoint = tmp_path / "image" / "checkpoints" / "step-000000003.ckpt"
    weights = tmp_path / "image.safetensors"
    export = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), str(checkpoint), "--out", str(weights)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]

    # the image run's held-out loss is measured with its EMA weights: start from those
    for name, source in (("from_weights", weights), ("from_checkpoint", checkpoint)):
        video = train(f"name={name}", "trainer.max_steps=1", f"init_from={source}", "init_ema=true", *common)
        assert video.returncode == 0, video.stderr[-3000:]
        assert "parity check passed" in video.stdout + video.stderr
        report = json.loads((tmp_path / name / "inflation.json").read_text())
        assert report["created"] and all("temporal" in n for n in report["created"]) and not report["unused"]
        assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= 1e-5

    def held_out(name):
        return [float(r["val/loss"]) for r in metric_rows(tmp_path / name) if r["val/loss"]]

    # the video model's new temporal layers start silent: at step 0 it is the image model
    assert held_out("from_weights")[0] == held_out("from_checkpoint")[0] == held_out("image")[-1]

    deeper = train("name=deeper", "trainer.max_steps=1", f"init_from={weights}", "model.depth=5", *common)
    assert deeper.returncode == 2 and "blocks.4" in deeper.stderr  # the strict inflation names the new block
    # three steps leave the gates so near zero that an extra block changes nothing measurable: give every tensor
    # a trained model's size, so the block that the image model lacks shows
    config, state = read_weights_file(weights)
    generator = torch.Generator().manual_seed(0)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    save_weights(tmp_path / "trained.safetensors", trained, config)
    loose = train(
        "name=loose",
        "trainer.max_steps=1",
        f"init_from={tmp_path / 'trained.safetensors'}",
        "model.depth=5",
        "init_strict=false",
        *common,
    )
    assert loose.returncode == 2 and "is not the image model" in loose.stderr  # the parity check refuses it
    assert not (tmp_path / "loose").exists() or not list((tmp_path / "loose").rglob("*.ckpt"))


@pytest.mark.slow
def test_checkpoints_keep_the_last_k_and_every_mth_and_an_unfinished_save_is_not_a_fresh_start(tmp_path):
    args = [
        f"run_root={tmp_path}",
        "name=keep",
        *TINY_NO_WANDB,
        "trainer.eval_every_n_steps=0",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.keep_last_checkpoints=2",
        "trainer.keep_every_n_steps=2",
        "sampling.prompts=[]",
        "evaluation=none",
    ]
    result = train(*args, "trainer.max_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "keep" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step-00000000{s}.ckpt" for s in (2, 4, 5)]

    # a run whose only checkpoint never finished writing stops, naming the problem, instead of starting at 0
    (tmp_path / "broken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "broken" / "checkpoints" / "step-000000003.ckpt.partial").write_bytes(b"half")
    broken = train(*[a.replace("name=keep", "name=broken") for a in args], "trainer.max_steps=5")
    assert broken.returncode == 2 and "only incomplete checkpoints" in broken.stderr


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again_with_a_clean_metrics_file(tmp_path):
    run = tmp_path / "again"
    args = [f"run_root={tmp_path}", "name=again", "trainer.max_steps=4", *TINY_NO_WANDB]
    args += ["trainer.checkpoint_every_n_steps=0", "trainer.eval_every_n_steps=0", "evaluation=none"]
    # what an attempt killed at step 5, before its first checkpoint, leaves behind: rows and no checkpoint
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as file:
        file.write("step,train/loss,val/loss\n0,,1.9\n" + "".join(f"{step},0.5,\n" for step in range(1, 6)))
    again = train(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "new run" in again.stdout + again.stderr
    steps = [int(r["step"]) for r in metric_rows(run)]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 4  # each step's row once


@pytest.mark.slow
def test_each_job_of_a_multirun_sweep_gets_its_own_run_directory_named_by_its_values(tmp_path):
    args = [f"run_root={tmp_path}", "name=sweep", *TINY_NO_WANDB, "evaluation=none", "trainer.eval_every_n_steps=0"]
    result = train("-m", "trainer.max_steps=1,2", *args, "trainer.checkpoint_every_n_steps=0")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {p.name: p for p in tmp_path.iterdir() if p.is_dir()}
    assert sorted(runs) == ["sweep-0-trainer.max_steps=1", "sweep-1-trainer.max_steps=2"]
    for name, steps in (("sweep-0-trainer.max_steps=1", 1), ("sweep-1-trainer.max_steps=2", 2)):
        assert yaml.safe_load((runs[name] / "config.yaml").read_text())["trainer"]["max_steps"] == steps
        assert [p.name for p in (runs[name] / "checkpoints").iterdir()] == [f"step-{steps:09d}.ckpt"]


@pytest.mark.slow
def test_staged_fine_tuning_trains_the_temporal_layers_alone_then_everything(tmp_path):
    """Stage 1 (optim.trainable=temporal) from an image model: every non-temporal weight stays the image model's,
    bit for bit, and the optimizer holds state for the temporal parameters only (the sharding report). Stage 2
    starts from stage 1's checkpoint with everything trainable and the image model's layers at a tenth of the lr."""
    common = [
        f"run_root={tmp_path}",
        *TINY_NO_WANDB,
        "trainer.max_steps=2",
        "trainer.eval_every_n_steps=0",
        "sampling.prompts=[]",
        "evaluation=none",
    ]
    image = image_weights(tmp_path / "image.safetensors")

    first = train("name=temporal", f"init_from={tmp_path / 'image.safetensors'}", "optim.trainable=temporal", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "temporal" / "checkpoints" / "step-000000002.ckpt"
    net = {k.removeprefix("net."): v for k, v in torch.load(checkpoint, weights_only=False)["state_dict"].items()}
    temporal = [k for k in net if is_temporal(k)]
    assert all(torch.equal(net[k], image[k]) for k in image)  # frozen: the image model's, bit for bit
    gates = [k for k in temporal if "temporal_modulation" in k]  # zero at initialization: silent layers
    assert gates and any(net[k].abs().sum() > 0 for k in gates)  # the temporal layers trained
    report = json.loads((tmp_path / "temporal" / "sharding" / "rank-0.json").read_text())
    temporal_elements = sum(net[k].numel() for k in temporal)
    assert report["parameters_trainable"] == temporal_elements < report["parameters_total"]
    assert report["optimizer_state_local"] == 2 * temporal_elements  # AdamW's two moments, nothing for the frozen

    second = train("name=all", f"init_from={checkpoint}", "optim.lr_scale.spatial=0.1", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    final = torch.load(tmp_path / "all" / "checkpoints" / "step-000000002.ckpt", weights_only=False)
    after = {k.removeprefix("net."): v for k, v in final["state_dict"].items()}
    assert any(not torch.equal(after[k], image[k]) for k in image)  # now the image model's layers train too
    report = json.loads((tmp_path / "all" / "sharding" / "rank-0.json").read_text())
    assert report["parameters_trainable"] == report["parameters_total"]
    groups = {g["name"]: g["lr"] for g in final["optimizer_states"][0]["param_groups"]}
    assert groups["spatial"] == pytest.approx(0.1 * groups["temporal"]) and groups["embeddings"] == groups["temporal"]


@pytest.mark.slow
def test_a_lora_run_resumes_exactly_and_exports_merged_or_as_peft_adapters(tmp_path):
    """LoRA adapters on the spatial attention and MLP with only the temporal layers otherwise trained: a run
    stopped at step 2 and resumed ends where the uninterrupted one does, bit for bit; its export is the plain
    network with the adapters merged, and its adapters alone, loaded by peft into the frozen base, are the same
    network."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from vdm.models.weights import build_from_weights
    from vdm.types import TextCond

    common = [
        f"run_root={tmp_path}",
        *TINY_NO_WANDB,
        f"init_from={tmp_path / 'image.safetensors'}",
        "optim.lora_rank=4",
        "optim.lora_alpha=8",
        "optim.trainable=temporal",
        "trainer.log_every_n_steps=1",
        "trainer.eval_every_n_steps=0",
        "trainer.checkpoint_every_n_steps=2",
        "sampling.prompts=[]",
        "evaluation=none",
    ]
    image_weights(tmp_path / "image.safetensors")
    whole = train("name=whole", "trainer.max_steps=4", *common)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = train("name=parts", "trainer.max_steps=2", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    rest = train("name=parts", "trainer.max_steps=4", *common)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert train_losses(tmp_path / "whole") == train_losses(tmp_path / "parts")
    state = {
        name: {k.removeprefix("net."): v for k, v in torch.load(
            tmp_path / name / "checkpoints" / "step-000000004.ckpt", weights_only=False)["state_dict"].items()}
        for name in ("whole", "parts")
    }  # fmt: skip
    assert state["whole"].keys() == state["parts"].keys()
    assert all(torch.equal(state["whole"][k], state["parts"][k]) for k in state["whole"])
    assert any(".lora_B." in k and state["whole"][k].abs().sum() > 0 for k in state["whole"])  # they trained

    checkpoint = tmp_path / "whole" / "checkpoints" / "step-000000004.ckpt"
    exported = subprocess.run(
        [sys.executable, "scripts/export.py", str(checkpoint), "--out", str(tmp_path / "merged.safetensors"),
         "--no-ema", "--adapters", str(tmp_path / "adapters")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    merged_net = build_from_weights(tmp_path / "merged.safetensors")
    base = {k.replace(".base_layer.", "."): v for k, v in state["whole"].items() if ".lora_" not in k}
    with torch.device("meta"):
        peft_net = SpaceTimeDiT(**read_weights_file(tmp_path / "merged.safetensors")[0])
    peft_net.load_state_dict(base, strict=True, assign=True)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "adapters")), peft_net)
    loaded = set_peft_model_state_dict(peft_net, load_file(str(tmp_path / "adapters" / "adapter_model.safetensors")))
    assert not loaded.unexpected_keys
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 32, 32, generator=generator)
    cond = TextCond(torch.randn(2, 5, 64, generator=generator), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 64))
    with torch.no_grad():
        difference = peft_net.eval()(x, torch.tensor([0.2, 0.7]), cond) - merged_net(x, torch.tensor([0.2, 0.7]), cond)
    assert difference.abs().max() <= 1e-5
