"""Source shards -> a latent cache (the format: vdm/data/cache.py), and the key a run's parts give a cache.

Work is by shard: each source shard becomes one cache shard, written whole (beside its name, then renamed) and
then its report; a shard with a report is done. So a precompute that is killed and started again redoes at most
the shards it was writing, and no sample is lost or written twice. Shards are spread over processes or ranks by
number (rank r of n takes every n-th), so any number of them can share a cache folder.

Latents are a deterministic function of the clip (the autoencoder's mean, vdm/autoencoders), and the text features
of the caption; the same shards and settings give the same bytes.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vdm.data import VideoData
from vdm.data.cache import (
    DTYPES,
    FORMAT,
    MANIFEST,
    Cache,
    StaleCache,
    digest,
    eval_shard_name,
    pack_sample,
    report_path,
    sample_hash,
    train_shard_name,
    write_json_atomically,
)
from vdm.data.clips import ClipMaker, SkipSample
from vdm.data.shard_writer import write_shard
from vdm.data.shards import iter_shard_samples
from vdm.data.stream import SHARD_ERRORS
from vdm.types import TextCond

# keys of a text or autoencoder config that say where its weights are or how decoding is batched, not what
# the latents are: moving a weights folder or decoding one frame at a time keeps a cache valid
NOT_IN_KEY = ("path", "checkpoint", "slicing")


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def part_key(config: dict, module: nn.Module) -> dict:
    """A frozen part's config (less NOT_IN_KEY) and the digest of the weights it built."""
    return {k: v for k, v in config.items() if k not in NOT_IN_KEY} | {"weights_sha256": weights_digest(module)}


def cache_key(data: VideoData, autoencoder_config: dict, autoencoder, text_config: dict, text_encoder) -> dict:
    """The key of a cache of `data`'s shards made by these parts (vdm.data.cache: what a key holds)."""
    return data.source_key | {
        "transforms": data.transforms_key(),
        "autoencoder": part_key(autoencoder_config, autoencoder),
        "text": part_key(text_config, text_encoder),
    }


@dataclass(frozen=True)
class ShardJob:
    """One source shard and the cache shard it becomes."""

    url: str
    out: Path
    views: int  # training shards: the cache's views; held-out shards: 1 (view 0, what evaluation reads)


def plan(data: VideoData, root: Path, views: int) -> list[ShardJob]:
    """Every shard of a cache of `data`, training shards of each source, then the held-out ones."""
    jobs = [
        ShardJob(url, root / train_shard_name(s, i), views)
        for s, source in enumerate(data.train_sources)
        for i, url in enumerate(source.shards)
    ]
    return jobs + [ShardJob(url, root / eval_shard_name(i), 1) for i, url in enumerate(data.eval_shard_list)]


def start_cache(root: Path, key: dict, views: int, dtype: str) -> Cache:
    """The manifest of a new cache, or the existing one if it was made with the same settings (to resume it)."""
    manifest = {"format": FORMAT, "key": key, "digest": digest(key), "views": views, "dtype": dtype}
    if (root / MANIFEST).is_file():
        cache = Cache.open(root)
        try:
            cache.check(key, complete=False)
        except StaleCache as error:
            raise StaleCache(f"{error} (--out: a folder of its own for each cache)") from None
        for name in ("views", "dtype"):
            if cache.manifest[name] != manifest[name]:
                raise StaleCache(
                    f"the cache {root} is being made with --{name} {cache.manifest[name]}, not {manifest[name]}"
                )
        return cache
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomically(root / MANIFEST, manifest)  # every rank writes the same bytes
    return Cache(root, manifest)


class Precompute:
    """Encodes shards into a cache: the data's clip makers, the frozen autoencoder and text encoder."""

    def __init__(
        self,
        data: VideoData,
        autoencoder,
        text_encoder,
        cache: Cache,
        *,
        batch_size: int = 8,
        device: torch.device | str = "cpu",
        on_clip: Callable[[int], None] = lambda n: None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.data, self.cache = data, cache
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval()
        self.dtype = DTYPES[cache.manifest["dtype"]]
        self.batch_size, self.on_clip = batch_size, on_clip
        self.centred = data.clip_maker(train=False, cached=False)  # view 0: the clip evaluation reads
        self.random = data.clip_maker(train=True, cached=False)  # views 1..: random starts and crops

    def run(self, jobs: list[ShardJob]) -> list[dict]:
        """Encode the jobs not done yet; their reports."""
        return [self.shard(job) for job in jobs if not report_path(job.out).is_file()]

    def shard(self, job: ShardJob) -> dict:
        start, skipped = time.perf_counter(), Counter()
        clips = write_shard(job.out, self.encoded(job, skipped))
        report = {
            "source": Path(job.url).name,
            "shard": job.out.name,
            "clips": clips,
            "skipped": dict(skipped),
            "bytes": job.out.stat().st_size,
            "seconds": round(time.perf_counter() - start, 3),
        }
        write_json_atomically(report_path(job.out), report)  # the shard is done
        return report

    def encoded(self, job: ShardJob, skipped: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, members) of the cached samples of one shard, in the shard's order, encoded `batch_size` at a time."""
        pending = []
        for sample in self.samples(job.url, skipped):
            made = self.views(sample, job.views, skipped)
            if made is not None:
                pending.append((sample, *made))
            if len(pending) == self.batch_size:
                yield from self.encode(pending)
                pending = []
        yield from self.encode(pending)

    @staticmethod
    def samples(url: str, skipped: Counter) -> Iterator[dict]:
        try:
            yield from iter_shard_samples(url)
        except SHARD_ERRORS:  # the complete samples stand, as in training (vdm.data.stream)
            skipped["shard_error"] += 1

    def views(self, sample: dict, views: int, skipped: Counter) -> tuple[int, list[dict]] | None:
        """(bucket, the clip's views) of a raw sample, or None (skipped, counted by reason)."""
        seed = int.from_bytes(hashlib.sha256(sample["__key__"].encode()).digest()[:8], "little")
        clips = []
        try:
            for view in range(views):
                maker: ClipMaker = self.centred if view == 0 else self.random
                bucket, clip = maker(sample, np.random.default_rng([seed, view]))
                clips.append(clip)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            return None
        return bucket, clips

    @torch.no_grad()
    def encode(self, pending: list[tuple[dict, int, list[dict]]]) -> Iterator[tuple[str, dict[str, bytes]]]:
        if not pending:
            return
        captions = [clips[0]["caption"] for _, _, clips in pending]
        text = self.text_encoder.encode(captions)  # (N, L, D): one call for the batch
        latents = {}  # index in pending -> (V, c, t, h, w)
        for bucket in sorted({b for _, b, _ in pending}):
            members = [i for i, (_, b, _) in enumerate(pending) if b == bucket]
            videos = torch.stack([clip["video"] for i in members for clip in pending[i][2]])  # (N V, C, T, H, W)
            encoded = torch.cat(
                [
                    self.autoencoder.encode(chunk.to(self.device).float().div_(127.5).sub_(1.0))
                    for chunk in videos.split(self.batch_size)
                ]
            )
            for index, views in zip(members, encoded.split([len(pending[i][2]) for i in members])):
                latents[index] = views  # (V, c, t, h, w)
        for index, (sample, bucket, clips) in enumerate(pending):
            key = sample["__key__"].replace("/", "_").replace(".", "_")  # a shard key has neither
            row = TextCond(text.tokens[index], text.mask[index], text.pooled[index])
            meta = {
                "cache": self.cache.digest,
                "bucket": bucket,
                "fps": clips[0]["fps"],
                "source_key": sample["__key__"],
                "source_sha256": sample_hash(sample),
            }
            members = pack_sample(
                key=key, caption=captions[index], latents=latents[index], text=row, meta=meta, dtype=self.dtype
            )
            self.on_clip(1)
            yield key, members
