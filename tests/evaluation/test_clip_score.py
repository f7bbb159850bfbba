"""CLIP score and temporal consistency, with clip-tiny (random weights, built locally: nothing downloads)."""

from __future__ import annotations

import pytest
import torch

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from vdm.evaluation.clip_score import ClipScorer

PROMPTS = ["the digit 3 moves up", "a red square", "a photo of a cat"]


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer.from_open_clip("clip-tiny", seed=0)


def random_videos(n: int, frames: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, frames, size, size, generator=generator) * 2 - 1  # (N, C, T, H, W) in [-1, 1]


def still(images: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, T, H, W): each image held for `frames` frames."""
    return images[:, :, None].expand(-1, -1, frames, -1, -1)


def test_a_still_video_is_perfectly_consistent_and_a_changing_one_less(scorer):
    videos = random_videos(3)
    assert torch.allclose(scorer.temporal_consistency(still(videos[:, :, 0], 5)), torch.ones(3), atol=1e-5)
    changing = scorer.temporal_consistency(videos)
    assert ((changing < 0.9999) & (changing >= -1)).all()
    # consecutive pairs only: a clip that alternates two images is as inconsistent as its one pair
    a, b = videos[:1, :, 0], videos[:1, :, 1]
    pair = torch.stack([a, b], dim=2)
    alternating = torch.stack([a, b, a, b], dim=2)
    assert torch.allclose(scorer.temporal_consistency(alternating), scorer.temporal_consistency(pair), atol=1e-5)


def test_each_video_is_scored_against_its_own_prompt_whatever_else_is_in_the_batch(scorer):
    videos = random_videos(3, seed=1)
    together = scorer.clip_score(videos, PROMPTS)
    alone = torch.cat([scorer.clip_score(videos[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-4)
    assert ((together >= 0) & (together <= 100)).all()
    order = [2, 0, 1]
    assert torch.allclose(scorer.clip_score(videos[order], [PROMPTS[i] for i in order]), together[order], atol=1e-4)
    # the frames are embedded in chunks of frame_batch: the chunking changes nothing
    chunked = ClipScorer(scorer.model, scorer.tokenizer, frame_batch=5)
    assert torch.allclose(chunked.clip_score(videos, PROMPTS), together, atol=1e-4)


def test_uint8_and_float_frames_score_alike(scorer):
    videos = (random_videos(2, seed=2) * 127.5 + 127.5).round().to(torch.uint8)
    as_float = videos.float() / 127.5 - 1
    assert torch.allclose(scorer.clip_score(videos, PROMPTS[:2]), scorer.clip_score(as_float, PROMPTS[:2]), atol=1e-4)
    figures = scorer.score(videos, PROMPTS[:2])
    assert figures["temporal_consistency"] == pytest.approx(
        scorer.temporal_consistency(as_float).mean().item(), abs=1e-5
    )


def test_a_video_of_the_image_a_prompt_matches_scores_higher_than_a_mismatched_one():
    # a model made so that the text embedding of prompt i points exactly at the image embedding of image i:
    # the text projection is solved for from the text tower's pooled features
    scorer = ClipScorer.from_open_clip("clip-tiny", seed=0)
    images = torch.full((2, 3, 32, 32), -1.0)
    images[0, 0] = images[1, 2] = 1.0  # a red image and a blue one
    targets = scorer.image_features(images)  # (2, D) unit
    projection = scorer.model.text_projection
    with torch.no_grad():
        projection.copy_(torch.eye(*projection.shape))
        pooled = scorer.model.encode_text(scorer.tokenizer(PROMPTS[:2]))  # (2, width), before projection
        projection.copy_(torch.linalg.pinv(pooled) @ targets)
    videos = still(images, 3)
    matched = scorer.clip_score(videos, PROMPTS[:2])
    swapped = scorer.clip_score(videos, PROMPTS[1::-1])
    assert torch.allclose(matched, torch.full((2,), 100.0), atol=0.01)
    # swapped, each video meets the other image's embedding: 100 cos of the two images (random towers make
    # every image embedding alike, about 0.9 here, so this is the margin there is)
    across = 100 * (targets[0] @ targets[1]).clamp(min=0)
    assert torch.allclose(swapped, across.expand(2), atol=0.01) and (swapped < matched - 2).all()


def test_weights_follow_the_seed_and_bad_inputs_are_refused(scorer):
    videos = random_videos(1, seed=4)
    same = ClipScorer.from_open_clip("clip-tiny", seed=0).clip_score(videos, PROMPTS[:1])
    other = ClipScorer.from_open_clip("clip-tiny", seed=1).clip_score(videos, PROMPTS[:1])
    assert torch.equal(same, scorer.clip_score(videos, PROMPTS[:1])) and not torch.equal(same, other)
    with pytest.raises(ValueError, match="2 frames"):
        scorer.temporal_consistency(videos[:, :, :1])
    with pytest.raises(ValueError, match="prompts"):
        scorer.clip_score(videos, PROMPTS[:2])
    with pytest.raises(ValueError, match="safetensors"):
        ClipScorer.from_open_clip("clip-tiny", checkpoint="weights.pt")
