"""The WebDataset pipeline: every sample once, bad data skipped and counted, order reproducible and resumable."""

from __future__ import annotations

import functools
import http.server
import io
import json
import pickle
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdm.data import (
    Bucket,
    ClipMaker,
    FrameSampling,
    SkipCounter,
    StreamTracker,
    TooMuchBadData,
    VideoData,
    VideoShardDataset,
)
from vdm.data.shard_writer import write_shard
from vdm.data.shards import expand_shards
from vdm.data.transforms import frames_to_clip
from vdm.data.video import encode_mp4

PLAIN = ClipMaker([Bucket(4, 16, 16, 3)], FrameSampling(frame_stride=2, random_start=False, random_crop=False))


def ramp_clip(num_frames: int = 12, height: int = 16, width: int = 16) -> np.ndarray:
    """Frame i is a flat grey of level 20 * i, so a decoded frame tells which source frame it was."""
    levels = (np.arange(num_frames) * 20).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


@functools.cache
def clip_members(num_frames: int = 12, height: int = 16, width: int = 16, caption: str = "a grey ramp") -> dict:
    frames = ramp_clip(num_frames, height, width)
    meta = {"fps": 8, "frames": num_frames, "width": width, "height": height}
    return {"mp4": encode_mp4(frames, fps=8), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def image_members(caption: str = "a still") -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return {"png": buffer.getvalue(), "txt": caption.encode()}


def make_shards(root: Path, prefix: str, num_shards: int, per_shard: int, members=clip_members) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = root / f"{prefix}-{shard:02d}.tar"
        write_shard(path, [(f"{prefix}{shard}k{i}", members()) for i in range(per_shard)])
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """4 shards of 5 clips each, keys s{shard}k{index}."""
    return make_shards(tmp_path_factory.mktemp("shards"), "s", 4, 5)


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch.keys]


def all_keys(prefix: str = "s", num_shards: int = 4, per_shard: int = 5) -> list[str]:
    return [f"{prefix}{s}k{i}" for s in range(num_shards) for i in range(per_shard)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_plain_pass_yields_every_sample_exactly_once(shards, num_workers):
    dataset = VideoShardDataset(shards, PLAIN, resampled=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    assert sorted(keys_of(loader)) == sorted(all_keys())


def test_plain_pass_split_across_ranks_covers_each_sample_once(shards):
    per_rank = [keys_of(VideoShardDataset(shards, PLAIN, resampled=False, rank=r, world_size=2)) for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(all_keys())


def test_training_epoch_splits_shards_so_no_sample_repeats_across_ranks_and_workers(shards):
    # 2 ranks x 2 workers, 4 shards: an epoch gives each worker one shard; unshuffled, its first 5 are one epoch
    seen = []
    for rank in (0, 1):
        dataset = VideoShardDataset(shards, PLAIN, resampled=True, rank=rank, world_size=2, seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        stream = iter(loader)
        batches = [next(stream) for _ in range(4)]  # 2 per worker, 3 clips each: the 5 of a shard, +1
        per_worker = {0: [], 1: []}
        for index, batch in enumerate(batches):
            per_worker[index % 2].extend(batch.keys)
        seen.extend(keys[:5] for keys in per_worker.values())
    first_epoch = [key for keys in seen for key in keys]
    assert Counter(first_epoch) == Counter(all_keys())


def test_clip_frames_follow_stride_and_are_normalized(shards):
    batch = next(iter(VideoShardDataset(shards[:1], PLAIN, resampled=False)))
    assert batch.video.shape == (3, 3, 4, 16, 16)
    # frames 0, 2, 4, 6 of the ramp: grey levels 0, 40, 80, 120 mapped to [-1, 1]
    expected = torch.tensor([0, 40, 80, 120]) / 127.5 - 1
    torch.testing.assert_close(batch.pixels()[0].mean(dim=(0, 2, 3)), expected, atol=0.02, rtol=0)
    assert batch.fps.tolist() == [4.0, 4.0, 4.0]  # 8 fps source, every 2nd frame


def test_target_fps_picks_the_stride_and_short_clips_pad_or_skip(tmp_path):
    (path,) = make_shards(tmp_path, "f", 1, 1)
    at_4fps = ClipMaker([Bucket(3, 16, 16, 1)], FrameSampling(fps=4.0, random_start=False, random_crop=False))
    batch = next(iter(VideoShardDataset([path], at_4fps, resampled=False)))
    torch.testing.assert_close(
        batch.pixels()[0].mean(dim=(0, 2, 3)), torch.tensor([0, 40, 80]) / 127.5 - 1, atol=0.02, rtol=0
    )
    assert batch.fps.tolist() == [4.0]

    long = [Bucket(8, 16, 16, 1)]  # 8 frames at stride 2 need 15 source frames; the clip has 12
    pad = ClipMaker(long, FrameSampling(frame_stride=2, random_start=False, random_crop=False, short_clips="pad"))
    batch = next(iter(VideoShardDataset([path], pad, resampled=False)))
    levels = torch.tensor([0, 40, 80, 120, 160, 200, 220, 220]) / 127.5 - 1  # frames 0..10, then the last (11)
    torch.testing.assert_close(batch.pixels()[0].mean(dim=(0, 2, 3)), levels, atol=0.02, rtol=0)
    skips = SkipCounter()
    skip = ClipMaker(long, FrameSampling(frame_stride=2, random_start=False, random_crop=False))
    assert keys_of(VideoShardDataset([path], skip, resampled=False, skips=skips)) == []
    assert skips.counts()["too_short"] == 1


def test_buckets_group_clips_by_shape_and_images_become_one_frame_clips(tmp_path):
    wide = make_shards(tmp_path, "w", 1, 4, members=lambda: clip_members(height=16, width=32, caption="wide"))
    tall = make_shards(tmp_path, "t", 1, 4, members=lambda: clip_members(height=32, width=16, caption="tall"))
    stills = make_shards(tmp_path, "i", 1, 4, members=image_members)
    buckets = [Bucket(4, 8, 16, 2), Bucket(4, 16, 8, 2), Bucket(1, 16, 16, 4)]
    maker = ClipMaker(buckets, FrameSampling(frame_stride=1))
    batches = list(VideoShardDataset(wide + tall + stills, maker, resampled=False))
    shapes = Counter((tuple(b.video.shape[2:]), b.captions[0]) for b in batches for _ in b.keys)
    assert shapes == {((4, 8, 16), "wide"): 4, ((4, 16, 8), "tall"): 4, ((1, 16, 16), "a still"): 4}
    assert all(len(set(b.captions)) == 1 for b in batches)  # each batch is one bucket


def test_sources_mix_by_weight(tmp_path):
    videos = make_shards(tmp_path, "v", 2, 20)
    stills = make_shards(tmp_path, "i", 2, 20, members=image_members)
    data = VideoData(
        sources=[{"shards": videos, "weight": 3.0}, {"shards": stills, "weight": 1.0}],
        num_frames=4,
        size=16,
        batch_size=4,
        image_batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
    )
    stream = iter(data.train_loader(seed=0))
    frames = [b.video.shape[2] for b in (next(stream) for _ in range(60))]
    image_share = frames.count(1) / len(frames)
    assert 0.15 < image_share < 0.35  # 1 of 4 samples, in batches of the same size


def test_resampled_stream_is_a_function_of_seed_and_rank(shards):
    def first_keys(seed, rank):
        dataset = VideoShardDataset(shards, PLAIN, resampled=True, seed=seed, shuffle_buffer=8, rank=rank, world_size=2)
        stream = iter(dataset)
        return [key for _ in range(5) for key in next(stream).keys]

    assert first_keys(0, 0) == first_keys(0, 0)
    assert first_keys(0, 0) != first_keys(1, 0)
    assert first_keys(0, 0) != first_keys(0, 1)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> VideoData:
    """Two sources, two shapes of video, random starts and crops: every part of the position is exercised."""
    root = tmp_path_factory.mktemp("mixture")
    square = make_shards(root, "q", 4, 6, members=lambda: clip_members(num_frames=12))
    wide = make_shards(root, "w", 4, 6, members=lambda: clip_members(num_frames=12, height=16, width=24))
    buckets = [
        {"frames": 4, "height": 16, "width": 16, "batch_size": 3},
        {"frames": 4, "height": 16, "width": 24, "batch_size": 2},
    ]
    return VideoData(
        sources=[{"shards": square, "weight": 1.0}, {"shards": wide, "weight": 2.0}],
        buckets=buckets,
        frame_stride=2,
        shuffle_buffer=5,
        num_workers=2,
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", [0, 1, 7])
def test_a_restored_stream_yields_exactly_the_batches_the_uninterrupted_one_would(mixture, num_workers, k):
    mixture.num_workers = num_workers
    reference = iter(mixture.train_loader(seed=5))
    uninterrupted = [next(reference) for _ in range(k + 6)]

    interrupted = iter(mixture.train_loader(seed=5))
    tracker = StreamTracker()
    for _ in range(k):
        tracker.update(next(interrupted))
    next(interrupted)  # prefetched beyond the last trained batch: must not count
    restored = iter(mixture.train_loader(seed=5, resume=StreamTracker(tracker.state()).state()))
    for expected in uninterrupted[k:]:
        batch = next(restored)
        assert batch.keys == expected.keys
        assert torch.equal(batch.video, expected.video)


def test_corrupt_video_short_clip_and_missing_caption_are_skipped_and_counted(tmp_path):
    good = clip_members()
    corrupt = dict(good, mp4=good["mp4"][: len(good["mp4"]) // 3])
    short = clip_members(num_frames=3)
    no_caption = dict(good, txt=b"  ")
    no_video = {"txt": b"a caption"}
    path = tmp_path / "mixed.tar"
    write_shard(path, [("a", good), ("b", corrupt), ("c", short), ("d", no_caption), ("e", no_video), ("f", good)])
    skips = SkipCounter()
    maker = ClipMaker([Bucket(4, 16, 16, 2)], FrameSampling(frame_stride=2, random_start=False, random_crop=False))
    assert keys_of(VideoShardDataset([str(path)], maker, resampled=False, skips=skips)) == ["a", "f"]
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
    keys = keys_of(VideoShardDataset(sources, PLAIN, resampled=False, skips=skips))
    # the whole first and last shard, and what of the truncated one was complete
    assert {f"s0k{i}" for i in range(5)} | {f"s2k{i}" for i in range(5)} <= set(keys)
    assert 10 <= len(keys) < 15 and len(keys) == len(set(keys))
    assert skips.counts()["shard_error"] == 2


def test_too_much_bad_data_stops_with_a_clear_message(tmp_path):
    good = clip_members()
    corrupt = dict(good, mp4=b"\x00" * 64)
    path = tmp_path / "bad.tar"
    write_shard(path, [(f"k{i}", good if i % 4 == 0 else corrupt) for i in range(40)])
    skips = SkipCounter(max_fraction=0.5, min_samples=10)
    with pytest.raises(TooMuchBadData, match="max_skip_fraction=0.5"):
        keys_of(VideoShardDataset([str(path)], PLAIN, resampled=False, skips=skips))


def test_skip_counts_reach_the_main_process_from_workers(tmp_path):
    good = clip_members()
    corrupt = dict(good, mp4=b"\x00" * 100)
    for shard in range(2):
        write_shard(tmp_path / f"w{shard}.tar", [(f"w{shard}ok", good), (f"w{shard}bad", corrupt)])
    data = VideoData(
        str(tmp_path / "w{0..1}.tar"),
        eval_shards=str(tmp_path / "w{0..1}.tar"),
        num_frames=4,
        frame_stride=2,
        size=16,
        batch_size=4,
    )
    assert sorted(keys_of(data.eval_loader(num_workers=2))) == ["w0ok", "w1ok"]
    assert data.skips.counts()["decode_error"] == 2


def test_no_member_is_ever_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    members = dict(clip_members(), pyd=pickle.dumps(Exploit()), pth=pickle.dumps(Exploit()))
    write_shard(tmp_path / "p.tar", [("x", members)])
    assert keys_of(VideoShardDataset([str(tmp_path / "p.tar")], PLAIN, resampled=False)) == ["x"]
    assert not marker.exists()


def test_frames_to_clip_covers_then_crops_centre_in_uint8_close_to_a_float_resize():
    frames = np.zeros((2, 30, 60, 3), dtype=np.uint8)
    frames[:, :, 15:45] = 255  # a white band in the middle half of the width
    clip = frames_to_clip(frames, 16, 16)
    assert clip.shape == (3, 2, 16, 16) and clip.dtype == torch.uint8 and clip.is_contiguous()
    assert clip[:, :, :, 4:12].float().mean() > 250  # the centre crop is the white band
    assert frames_to_clip(frames, 8, 32).shape == (3, 2, 8, 32)
    # the uint8 resize stays within one grey level of resizing in float
    photo = np.random.default_rng(0).integers(0, 256, (3, 45, 70, 3), dtype=np.uint8)
    as_float = (
        torch.nn.functional.interpolate(
            torch.from_numpy(photo).permute(0, 3, 1, 2).float(), size=(16, 25), mode="bilinear", antialias=True
        )
        .round()
        .clamp(0, 255)
    )
    as_uint8 = frames_to_clip(photo, 16, 25).permute(1, 0, 2, 3).float()
    assert (as_uint8 - as_float).abs().max() <= 1


def test_shard_specs_expand_braces_allow_listed_schemes_only(shards):
    root = str(Path(shards[0]).parent)
    assert expand_shards(root + "/s-{00..03}.tar") == shards
    with pytest.raises(ValueError, match="not allowed"):
        expand_shards("pipe:curl http://example.com/x.tar")
    with pytest.raises(ValueError, match="not allowed"):
        expand_shards("ftp://example.com/x-{0..3}.tar")
    assert expand_shards("s3://bucket/x-{0..1}.tar") == ["s3://bucket/x-0.tar", "s3://bucket/x-1.tar"]
    with pytest.raises(FileNotFoundError, match="none of the"):
        expand_shards(root + "/nope-{0..3}.tar")


def test_shards_stream_over_http(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(Path(shards[0]).parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/s-{{00..01}}.tar"
        data = VideoData(url, eval_shards=url, num_frames=4, frame_stride=2, size=16, batch_size=4)
        assert sorted(keys_of(data.eval_loader())) == sorted(all_keys(num_shards=2))
    finally:
        server.shutdown()


def test_bad_data_config_names_the_key(shards):
    with pytest.raises(ValueError, match="num_frames"):
        VideoData(shards[0], num_frames=0)
    with pytest.raises(ValueError, match="exactly one of train_shards and sources"):
        VideoData()
    with pytest.raises(ValueError, match="fewer than the 4 loader workers"):
        VideoData(shards[0], num_workers=2).train_dataset(seed=0, world_size=2)
