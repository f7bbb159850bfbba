"""The WebDataset pipeline: every sample once, bad data skipped and counted, order reproducible."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from vdm.data import ClipSampler, SkipCounter, VideoData, VideoShardDataset
from vdm.data.shard_writer import write_shard
from vdm.data.shards import expand_shards
from vdm.data.transforms import frames_to_clip
from vdm.data.video import encode_mp4

SAMPLER = ClipSampler(num_frames=4, frame_stride=2, size=16, random_start=False, random_crop=False)


def ramp_clip(num_frames: int = 12, height: int = 16, width: int = 16) -> np.ndarray:
    """Frame i is a flat grey of level 20 * i, so a decoded frame tells which source frame it was."""
    levels = (np.arange(num_frames) * 20).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def sample(key: str, frames: np.ndarray | None = None, caption: str = "a grey ramp") -> tuple[str, dict]:
    frames = ramp_clip() if frames is None else frames
    meta = {"fps": 8, "frames": len(frames)}
    return key, {"mp4": encode_mp4(frames, fps=8), "txt": caption.encode(), "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """4 shards of 5 clips each, keys s{shard}k{index}."""
    root = tmp_path_factory.mktemp("shards")
    clip = sample("x")[1]  # encoding is deterministic: reuse one clip's bytes
    paths = []
    for shard in range(4):
        path = root / f"shard-{shard:02d}.tar"
        write_shard(path, [(f"s{shard}k{i}", clip) for i in range(5)])
        paths.append(str(path))
    return paths


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch.keys]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_plain_pass_yields_every_sample_exactly_once(shards, num_workers):
    dataset = VideoShardDataset(shards, SAMPLER, batch_size=3, resampled=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    keys = keys_of(loader)
    assert sorted(keys) == sorted(f"s{s}k{i}" for s in range(4) for i in range(5))


def test_plain_pass_split_across_ranks_covers_each_sample_once(shards):
    per_rank = [keys_of(VideoShardDataset(shards, SAMPLER, 2, resampled=False, rank=r, world_size=2)) for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(f"s{s}k{i}" for s in range(4) for i in range(5))


def test_clip_frames_follow_stride_and_are_normalized(shards):
    batch = next(iter(VideoShardDataset(shards[:1], SAMPLER, 2, resampled=False)))
    assert batch.video.shape == (2, 3, 4, 16, 16)
    # frames 0, 2, 4, 6 of the ramp: grey levels 0, 40, 80, 120 mapped to [-1, 1]
    expected = torch.tensor([0, 40, 80, 120]) / 127.5 - 1
    torch.testing.assert_close(batch.video[0].mean(dim=(0, 2, 3)), expected, atol=0.02, rtol=0)
    assert batch.fps.tolist() == [4.0, 4.0]  # 8 fps source, every 2nd frame


def test_resampled_stream_is_a_function_of_seed_and_rank(shards):
    def first_keys(seed, rank):
        dataset = VideoShardDataset(
            shards, SAMPLER, 4, resampled=True, seed=seed, shuffle_buffer=8, rank=rank, world_size=2
        )
        stream = iter(dataset)
        return [key for _ in range(5) for key in next(stream).keys]

    assert first_keys(0, 0) == first_keys(0, 0)
    assert first_keys(0, 0) != first_keys(1, 0)
    assert first_keys(0, 0) != first_keys(0, 1)


def test_corrupt_video_short_clip_and_missing_caption_are_skipped_and_counted(tmp_path):
    good = sample("good")[1]
    corrupt = dict(good, mp4=good["mp4"][: len(good["mp4"]) // 3])
    short = sample("short", frames=ramp_clip(num_frames=3))[1]
    no_caption = dict(good, txt=b"  ")
    no_video = {"txt": b"a caption"}
    path = tmp_path / "mixed.tar"
    write_shard(path, [("a", good), ("b", corrupt), ("c", short), ("d", no_caption), ("e", no_video), ("f", good)])
    skips = SkipCounter()
    keys = keys_of(VideoShardDataset([str(path)], SAMPLER, 2, resampled=False, skips=skips))
    assert keys == ["a", "f"]
    counts = skips.counts()
    assert counts["decode_error"] + counts["too_short"] == 2  # the truncated mp4 may decode a frame or two
    assert counts["too_short"] >= 1
    assert counts["missing_caption"] == 1 and counts["missing_video"] == 1


def test_truncated_and_missing_shards_are_skipped_and_counted(shards, tmp_path):
    data = Path(shards[1]).read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    skips = SkipCounter()
    sources = [shards[0], str(truncated), str(tmp_path / "missing.tar"), shards[2]]
    keys = keys_of(VideoShardDataset(sources, SAMPLER, 4, resampled=False, skips=skips))
    # the whole first and last shard, and what of the truncated one was complete
    assert {f"s0k{i}" for i in range(5)} | {f"s2k{i}" for i in range(5)} <= set(keys)
    assert 10 <= len(keys) < 15 and len(keys) == len(set(keys))
    assert skips.counts()["shard_error"] == 2


def test_skip_counts_reach_the_main_process_from_workers(tmp_path):
    good = sample("good")[1]
    corrupt = dict(good, mp4=b"\x00" * 100)
    for shard in range(2):
        write_shard(tmp_path / f"w{shard}.tar", [(f"w{shard}ok", good), (f"w{shard}bad", corrupt)])
    data = VideoData(
        str(tmp_path / "w{0..1}.tar"),
        str(tmp_path / "w{0..1}.tar"),
        num_frames=4,
        frame_stride=2,
        size=16,
        batch_size=4,
    )
    assert sorted(keys_of(data.eval_loader(num_workers=2))) == ["w0ok", "w1ok"]
    assert data.skips.counts()["decode_error"] == 2


def test_frames_to_clip_resizes_shorter_side_and_crops_centre():
    frames = np.zeros((2, 30, 60, 3), dtype=np.uint8)
    frames[:, :, 15:45] = 255  # a white band in the middle third of the width
    clip = frames_to_clip(frames, size=16)
    assert clip.shape == (3, 2, 16, 16)
    assert clip.min() >= -1 and clip.max() <= 1
    assert clip[:, :, :, 4:12].mean() > 0.9  # the centre crop is the white band


def test_shard_specs_expand_braces_and_refuse_urls(shards):
    root = str(Path(shards[0]).parent)
    assert expand_shards(root + "/shard-{00..03}.tar") == shards
    with pytest.raises(ValueError, match="only local paths"):
        expand_shards("pipe:curl http://example.com/x.tar")
    with pytest.raises(FileNotFoundError, match="none of the"):
        expand_shards(root + "/nope-{0..3}.tar")


def test_bad_data_config_names_the_key(shards):
    with pytest.raises(ValueError, match="num_frames"):
        VideoData(shards[0], num_frames=0)
