"""The Moving Digits evaluator: reads real held-out clips right, chance for shuffled captions, and the
prompts it checks against are the dataset's own.

(Not tests/evaluation/test_moving_digits.py: tests/data has that basename, and pytest's default import
mode refuses two test modules of one name.)
"""

from __future__ import annotations

import ast
import json
import tarfile
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import scripts.make_moving_digits as script
import vdm  # noqa: F401  (before lightning, which the callback test imports: makes torchvision importable)
from vdm.evaluation import moving_digits as md

ROOT = Path(__file__).resolve().parents[2]
EVAL_SHARD = ROOT / "data" / "moving_digits" / "eval-000000.tar.gz"


def shard_metadata() -> list[tuple[str, dict]]:
    """(caption, json metadata) of every held-out clip, read straight from the tar."""
    members: dict[str, dict] = {}
    with tarfile.open(EVAL_SHARD) as tar:
        for member in tar:
            key, suffix = member.name.rsplit(".", 1)
            if suffix in ("txt", "json"):
                members.setdefault(key, {})[suffix] = tar.extractfile(member).read().decode()
    return [(m["txt"], json.loads(m["json"])) for _, m in sorted(members.items())]


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, list[str]]:
    # cut as training cuts them (conf/data/moving_digits.yaml): 8 frames, every 2nd, 32 x 32
    from scripts.eval_moving_digits import held_out_clips

    return held_out_clips(str(EVAL_SHARD), frames=8, frame_stride=2, size=32)


@pytest.fixture(scope="module")
def classifier() -> md.DigitClassifier:
    return md.training_classifier()


def pixels(video: torch.Tensor) -> torch.Tensor:
    return video.float() / 127.5 - 1  # uint8 -> [-1, 1], as generated videos come


# --- the dataset's conventions ---------------------------------------------------------------------------


def test_constants_are_the_dataset_scripts_defaults():
    assert md.DIRECTIONS == script.DIRECTIONS
    tree = ast.parse((ROOT / "scripts" / "make_moving_digits.py").read_text())
    defaults = {  # option -> its default, for the add_argument calls whose default is a literal
        node.args[0].value: k.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for k in node.keywords
        if k.arg == "default" and isinstance(k.value, ast.Constant)
    }
    assert (defaults["--canvas"], defaults["--digit-size"]) == (md.CANVAS, md.DIGIT_SIZE)
    assert (defaults["--eval-digits"], defaults["--seed"]) == (md.EVAL_DIGITS, md.SEED)


def test_classifier_learns_only_scans_no_held_out_clip_uses(classifier):
    split = md.split_scans()
    assert set(split["train"]).isdisjoint(split["eval"]) and len(split["train"]) + len(split["eval"]) == 1797
    held_out_sources = {int(meta["source"].split("/")[1]) for _, meta in shard_metadata()}
    assert held_out_sources <= set(split["eval"].tolist())
    assert classifier.model.shape_fit_[0] == len(split["train"]) * len(md.BLURS)


def test_captions_round_trip_and_agree_with_the_clip_metadata():
    for caption, meta in shard_metadata():
        prompt = md.parse_caption(caption)
        assert prompt.caption == caption
        assert (prompt.digit, prompt.direction, prompt.bounces) == (meta["digit"], meta["direction"], meta["bounces"])
    for bad in ("the digit 7 moves sideways", "the digit 12 moves up", "a digit 7 moves up", ""):
        with pytest.raises(ValueError):
            md.parse_caption(bad)


def test_prompt_set_is_every_digit_in_every_direction_once():
    prompts = [md.parse_caption(p) for p in md.prompt_set()]
    assert len(prompts) == 80 and not any(p.bounces for p in prompts)
    assert {(p.digit, p.direction) for p in prompts} == {(d, name) for d in range(10) for name in md.DIRECTIONS}


# --- calibration on real clips ---------------------------------------------------------------------------


def test_real_held_out_clips_read_nearly_perfectly_and_shuffled_captions_read_chance(held_out, classifier):
    from scripts.eval_moving_digits import calibrate

    videos, captions = held_out
    assert len(captions) == 512
    figures = calibrate(videos, captions, seed=0)
    real, chance = figures["real"], figures["shuffled"]
    assert real["digit_acc"] >= 0.95 and real["motion_acc"] >= 0.98, real
    # chance is 10% digit, about 12.5% motion; 512 clips put 3 standard errors near 4 points
    assert chance["digit_acc"] <= 0.16 and chance["motion_acc"] <= 0.18, chance
    # uint8 clips and the same clips as generated videos come ([-1, 1] floats) read alike
    assert md.score(pixels(videos), captions, classifier) == real


def test_a_folder_of_samples_is_scored_against_its_prompts(tmp_path):
    from scripts.eval_moving_digits import main, sample_folder
    from vdm.data.video import encode_mp4

    prompts = md.prompt_set()[::10]  # 8 prompts: every digit-direction pair is a different one
    videos = render_prompts(prompts)
    frames = ((videos + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()  # (N, T, H, W, 3)
    for index, clip in enumerate(frames):
        (tmp_path / f"{index:03d}.mp4").write_bytes(encode_mp4(clip.repeat(2, axis=1).repeat(2, axis=2), 4))
    (tmp_path / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))
    read, read_prompts = sample_folder(tmp_path)
    assert read.shape == (8, 3, 8, 64, 64) and read_prompts == prompts
    assert md.score(read, prompts) == {"digit_acc": 1.0, "motion_acc": 1.0, "consistency": 1.0}
    assert main(["--samples", str(tmp_path)]) == 0


def test_reversed_clips_move_the_opposite_way(held_out, classifier):
    videos, captions = held_out
    keep = [i for i, c in enumerate(captions) if not md.parse_caption(c).bounces]
    reversed_videos = videos[keep].flip(2)
    prompts = [md.parse_caption(captions[i]) for i in keep]
    assert md.score(reversed_videos, [p.caption for p in prompts], classifier)["motion_acc"] == 0.0
    opposite = [md.DigitPrompt(p.digit, md._OPPOSITE[p.direction]).caption for p in prompts]
    assert md.score(reversed_videos, opposite, classifier)["motion_acc"] >= 0.98


def test_a_still_digit_is_read_but_does_not_move_and_a_blank_video_scores_nothing(held_out, classifier):
    videos, captions = held_out
    still = videos[:64, :, :1].expand(-1, -1, 8, -1, -1)
    figures = md.score(still, captions[:64], classifier)
    assert figures["digit_acc"] >= 0.9 and figures["motion_acc"] == 0.0 and figures["consistency"] == 0.0
    blank = torch.full((8, 3, 8, 32, 32), -1.0)
    assert md.score(blank, captions[:8], classifier) == {"digit_acc": 0.0, "motion_acc": 0.0, "consistency": 0.0}
    assert (md.read_videos(blank, classifier).digits == -1).all()


def test_soft_dim_noisy_or_larger_frames_still_read(held_out, classifier):
    # what a half-trained model draws: blurred, dimmer strokes on a noisy background, at another size
    videos, captions = held_out
    x = pixels(videos[:128])
    soft = md.blur(x.flatten(0, 2), 1.0).view_as(x)
    noise = 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    degraded = ((soft + 1) * 0.7 - 1 + noise).clamp(-1, 1)
    figures = md.score(degraded, captions[:128], classifier)
    assert figures["digit_acc"] >= 0.85 and figures["motion_acc"] >= 0.95, figures
    larger = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # 64 x 64
    assert md.score(larger, captions[:128], classifier)["motion_acc"] >= 0.98


# --- motion rules ----------------------------------------------------------------------------------------


def test_compass_names_each_direction_and_has_a_dead_zone():
    for name, (dy, dx) in md.DIRECTIONS.items():
        assert md.compass(np.array([dy, dx]) * 5.0) == name
    assert md.compass(np.array([np.sin(np.radians(20)), np.cos(np.radians(20))]) * 5) == "right"  # drift: still right
    assert md.compass(np.array([np.sin(np.radians(25)), np.cos(np.radians(25))]) * 5) == "down and to the right"
    assert md.compass(np.array([0.5, 0.5])) is None  # under MIN_TRAVEL: no direction
    assert md.compass(np.array([np.nan, 3.0])) is None


def test_bounce_needs_out_along_the_prompt_and_back_against_it():
    out_and_back = np.array([[10, x] for x in (0, 2, 4, 6, 4, 2, 0, -2)], dtype=float)  # (T, 2) right, then left
    straight = np.array([[10, 2 * x] for x in range(8)], dtype=float)
    assert md.motion_correct(out_and_back, md.DigitPrompt(3, "right", bounces=True))
    assert not md.motion_correct(out_and_back, md.DigitPrompt(3, "left", bounces=True))
    assert not md.motion_correct(straight, md.DigitPrompt(3, "right", bounces=True))  # never came back
    assert md.motion_correct(straight, md.DigitPrompt(3, "right"))
    straight[4] = np.nan  # a frame the digit vanished from
    assert not md.motion_correct(straight, md.DigitPrompt(3, "right"))


# --- the training callback -------------------------------------------------------------------------------


def render_prompts(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Videos that do what the prompts say, drawn by the dataset script from held-out scans:
    (N, 3, 8, 32, 32) in [-1, 1], 16 frames at stride 2 as training cuts them."""
    from sklearn.datasets import load_digits

    digits, held_out = load_digits(), md.split_scans()["eval"]
    rng = np.random.default_rng(seed)
    clips = []
    for text in prompts:
        prompt = md.parse_caption(text)
        scan = digits.images[next(i for i in held_out if digits.target[i] == prompt.digit)]
        digit = Image.fromarray((scan * (255 / 16)).astype(np.uint8)).resize((md.DIGIT_SIZE,) * 2, Image.BILINEAR)
        corners = script.plan_path(rng, md.DIRECTIONS[prompt.direction], False, 16, md.CANVAS - md.DIGIT_SIZE)
        frames = script.render_clip(np.asarray(digit), corners, md.CANVAS)[::2]  # (8, H, W, 3)
        clips.append(torch.from_numpy(frames).permute(3, 0, 1, 2))
    return pixels(torch.stack(clips))


class FakeLog:
    def __init__(self):
        self.rows = []

    def write(self, trainer, step, metrics):
        if trainer.is_global_zero:
            self.rows.append((step, metrics))


def fake_trainer(step: int, max_steps: int = 100, rank_zero: bool = True) -> SimpleNamespace:
    """One process (the split over ranks is tested with real processes in tests/distributed)."""
    plugin = SimpleNamespace(forward_context=nullcontext)
    strategy = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor)
    return SimpleNamespace(
        global_step=step,
        max_steps=max_steps,
        is_global_zero=rank_zero,
        precision_plugin=plugin,
        world_size=1,
        global_rank=0,
        strategy=strategy,
    )


def test_callback_scores_generated_videos_on_schedule_and_keeps_history(classifier):
    from vdm.training.quality import MovingDigitsQuality

    module = SimpleNamespace(net=torch.nn.Linear(1, 1))
    calls = []

    def generate_fn(pl_module, prompts, first_index):
        calls.append((len(prompts), pl_module.net.training))
        return render_prompts(prompts)

    log = FakeLog()
    callback = MovingDigitsQuality(generate_fn, log, every_n_steps=10, batch_size=32, classifier=classifier)
    for step in (5, 10, 10):  # step 10 twice: the end-of-fit hook after the last batch must not repeat it
        callback.on_train_batch_end(fake_trainer(step), module, None, None, 0)
    assert [n for n, _ in calls] == [32, 32, 16] and not any(training for _, training in calls)
    assert module.net.training  # put back
    ((step, values),) = callback.history
    assert step == 10 and log.rows == [(10, values)]
    assert values["eval/digit_acc"] >= 0.9 and values["eval/motion_acc"] == 1.0, values

    # the last step is scored even off the schedule; a preempted run's end is not
    callback.on_train_batch_end(fake_trainer(13, max_steps=13), module, None, None, 0)
    callback.on_train_end(fake_trainer(14, max_steps=20), module)
    assert [s for s, _ in callback.history] == [10, 13]

    # other ranks generate too (sampling may be collective) but write nothing
    calls.clear()
    other = MovingDigitsQuality(
        lambda m, p, first: torch.full((len(p), 3, 8, 32, 32), -1.0), log, 10, classifier=classifier
    )
    assert other.evaluate(fake_trainer(20, rank_zero=False), module) is None
    assert other.evaluate(fake_trainer(30), module) == {
        "eval/digit_acc": 0.0,
        "eval/motion_acc": 0.0,
        "eval/consistency": 0.0,
    }
    assert [s for s, _ in log.rows] == [10, 13, 30]


def test_temporal_consistency_needs_no_prompt_passes_real_straight_clips_and_fails_shuffled_frames(
    held_out, classifier
):
    """Every real clip that does not bounce is consistent whatever its caption says; its frames in another order,
    or a bounce, are not steady motion; one frame of another digit in eight still persists, three do not."""
    videos, captions = held_out
    straight = [i for i, c in enumerate(captions) if not md.parse_caption(c).bounces]
    bounces = [i for i, c in enumerate(captions) if md.parse_caption(c).bounces]
    wrong_prompts = [captions[(i + 1) % len(captions)] for i in straight]  # consistency does not read them
    assert md.score(videos[straight], wrong_prompts, classifier)["consistency"] == 1.0
    assert md.score(videos[bounces], [captions[i] for i in bounces], classifier)["consistency"] <= 0.05
    order = torch.tensor([3, 0, 6, 1, 7, 4, 2, 5])
    shuffled = md.score(videos[straight][:, :, order], wrong_prompts, classifier)["consistency"]
    assert shuffled <= 0.05, shuffled

    trajectory = np.stack([np.arange(8.0), 2 * np.arange(8.0)], axis=1)  # 2 px per frame to the right, down
    assert md.consistent(np.array([3] * 7 + [8]), trajectory)
    assert not md.consistent(np.array([3] * 5 + [8] * 3), trajectory)
    assert not md.consistent(np.array([3] * 8), np.zeros((8, 2)))  # a still digit does not move
    assert not md.consistent(np.array([3] * 8), trajectory / 8)  # nor does one that drifts 2 pixels
    jitter = trajectory + np.array([[0, 1.5], [0, -1.5]] * 4)
    assert not md.consistent(np.array([3] * 8), jitter)  # 1.5 px off the line, back and forth
