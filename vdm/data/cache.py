"""Latent caches: shards of clips already encoded (autoencoder latents, text-encoder features), which training
reads instead of decoding and encoding every clip on every step; and the key that says what made a cache.

A cache is a folder (scripts/precompute.py writes it; vdm/latent_cache.py encodes):
    cache.json              the manifest: the key, its digest, the views, the dtype, the cache's shards
    train-s0-000000.tar     one cache shard per source shard (here source 0, its shard 0), written whole
    train-s0-000000.json    that shard's report (clips, skipped by reason, bytes, seconds): there once it is done
    eval-000000.tar         the held-out shards' clips (view 0 only), with their reports

A cached sample is <key>.safetensors:
    latent  (V, c, t, h, w)  V views of the clip, normalized latents as the autoencoder gives them
    tokens  (n, D)           the caption's text features up to its last real token (n <= the encoder's L)
    mask    (n,)             bool, True on real tokens
    pooled  (D,)
with <key>.txt (the caption) and <key>.json (the source sample's key and content hash, fps, bucket, the cache's
digest). Nothing here is a pickle: safetensors and JSON only.

Views. View 0 is the clip evaluation reads (from the first frame, centred crop). Views 1..V-1 start and crop at
random, drawn from (the source sample's key, the view). Training takes one view per clip, drawn from the same
(seed, rank, worker, ordinal) stream an on-the-fly crop would use: a cache of V views gives each clip V fixed crops
and starts instead of a fresh one every epoch (data.random_crop and data.random_start do not apply to it).

The key. What made a cache, section by section: the source shards (names and sizes, and per sample its key and a
content hash), the transforms (bucket shapes, frame stride or fps, short clips), the autoencoder (config and a
digest of its weights) and the text encoder (the same). Training from a cache compares the key its own config gives
with the cache's and stops on any difference, naming it (`key_differences`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from vdm.data.buckets import Bucket
from vdm.data.clips import SkipSample
from vdm.data.stream import Source
from vdm.types import TextCond, VideoBatch

MANIFEST = "cache.json"
FORMAT = 1
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class StaleCache(ValueError):
    """A cache made with other settings than the run's, or not (completely) made."""


# ------------------------------------------------------------------ the key


def digest(value) -> str:
    """sha256 of a JSON value, keys sorted: the same settings give the same digest on every machine."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sample_hash(sample: dict) -> str:
    """sha256 of a raw sample's members (extensions and bytes, in order of extension): its content."""
    h = hashlib.sha256()
    for extension in sorted(k for k in sample if not k.startswith("__")):
        h.update(extension.encode() + b"\0" + len(sample[extension]).to_bytes(8, "little") + sample[extension])
    return h.hexdigest()


def shard_entry(url: str) -> dict:
    """How a cache names a source shard: its file name, and its size where it can be read here."""
    try:
        size = os.path.getsize(url)
    except OSError:  # remote, or no longer here (a cache outlives its sources): the name alone
        size = None
    return {"name": Path(url).name, "size": size}


def transforms_key(buckets: Sequence[Bucket], frame_stride: int, fps: float | None, short_clips: str) -> dict:
    """What turns a source sample into a clip, besides the crop and start (the views)."""
    return {
        "buckets": [[b.frames, b.height, b.width] for b in buckets],
        "frame_stride": frame_stride,
        "fps": fps,
        "short_clips": short_clips,
    }


def key_differences(made: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Where two keys differ, as 'path: the cache's value, this run's' (a source shard of unknown size matches any)."""
    if isinstance(made, dict) and isinstance(wanted, dict):
        out = []
        for name in sorted(set(made) | set(wanted), key=str):
            path = f"{prefix}.{name}" if prefix else str(name)
            if name not in made or name not in wanted:
                there, here = (_short(key.get(name, "(absent)")) for key in (made, wanted))
                out.append(f"{path}: {there} in the cache, {here} here")
            elif not (name == "size" and None in (made[name], wanted[name])):
                out += key_differences(made[name], wanted[name], path)
        return out
    if isinstance(made, list) and isinstance(wanted, list) and len(made) == len(wanted):
        return [d for i, (a, b) in enumerate(zip(made, wanted)) for d in key_differences(a, b, f"{prefix}[{i}]")]
    if made != wanted:
        return [f"{prefix}: {_short(made)} in the cache, {_short(wanted)} here"]
    return []


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# ------------------------------------------------------------------ the folder


def train_shard_name(source: int, shard: int) -> str:
    return f"train-s{source}-{shard:06d}.tar"


def eval_shard_name(shard: int) -> str:
    return f"eval-{shard:06d}.tar"


def report_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def write_json_atomically(path: Path, value: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    partial.replace(path)


@dataclass
class Cache:
    """A cache folder and its manifest."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> Cache:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no latent cache at {root} (no {MANIFEST}): make it with `python scripts/precompute.py --out {root} "
                "<the run's overrides>`"
            )
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise StaleCache(f"{path}: cache format {manifest.get('format')}, this vdm reads {FORMAT}: make it again")
        return cls(root, manifest)

    @property
    def key(self) -> dict:
        return self.manifest["key"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    def train_shards(self) -> list[list[Path]]:
        """Per source, its cache shards, in the order of the source's shards."""
        return [
            [self.root / train_shard_name(s, i) for i in range(len(shards))]
            for s, shards in enumerate(self.key["sources"])
        ]

    def eval_shards(self) -> list[Path]:
        return [self.root / eval_shard_name(i) for i in range(len(self.key["eval"]))]

    def all_shards(self) -> list[Path]:
        return [path for shards in self.train_shards() for path in shards] + self.eval_shards()

    def missing(self) -> list[Path]:
        """The cache shards not (completely) written yet."""
        return [path for path in self.all_shards() if not report_path(path).is_file()]

    def reports(self) -> list[dict]:
        return [json.loads(report_path(p).read_text()) for p in self.all_shards() if report_path(p).is_file()]

    def check(self, wanted_key: dict, complete: bool = True) -> None:
        """StaleCache naming what differs, or what is missing (if `complete`), unless this cache is made as
        `wanted_key` (and complete)."""
        differences = key_differences(self.key, wanted_key)
        if differences:
            raise StaleCache(
                f"the latent cache {self.root} was made with other settings than this run's; "
                + "; ".join(differences[:8])
                + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
                + ". Make a cache for these settings (scripts/precompute.py --out <another folder>) or train with "
                "the cache's"
            )
        missing = self.missing() if complete else []
        if missing:
            raise StaleCache(
                f"the latent cache {self.root} is not complete: {len(missing)} of {len(self.all_shards())} shards "
                f"not written (first: {missing[0].name}); run scripts/precompute.py again to finish it (it resumes)"
            )

    def sources(self, weights: Sequence[float]) -> list[Source]:
        return [Source(tuple(str(p) for p in shards), w) for shards, w in zip(self.train_shards(), weights)]


# ------------------------------------------------------------------ one cached sample


def pack_sample(
    *, key: str, caption: str, latents: torch.Tensor, text: TextCond, meta: dict, dtype: torch.dtype
) -> dict[str, bytes]:
    """The members of one cached sample. latents (V, c, t, h, w); text: this one caption (L, D), (L,), (D,)."""
    real = text.mask.nonzero()
    length = int(real.max()) + 1 if len(real) else text.mask.shape[0]  # through the last real token
    tensors = {
        "latent": latents.to(dtype).contiguous().cpu(),
        "tokens": text.tokens[:length].to(dtype).contiguous().cpu(),
        "mask": text.mask[:length].contiguous().cpu(),
        "pooled": text.pooled.to(dtype).contiguous().cpu(),
    }
    return {
        "safetensors": save_tensors(tensors),
        "txt": caption.encode(),
        "json": json.dumps(meta | {"key": key}, sort_keys=True).encode(),
    }


class CachedClipMaker:
    """A cached sample -> (bucket index, clip): the WorkerStream's clip maker for a cache, so a cache is read with
    everything a stream of raw shards has (mixing, shuffling, buckets, exact resume, skip accounting)."""

    def __init__(self, buckets: Sequence[Bucket], cache_digest: str, train: bool):
        self.buckets, self.cache_digest, self.train = list(buckets), cache_digest, train

    def __call__(self, sample: dict, rng: np.random.Generator) -> tuple[int, dict]:
        try:
            meta = json.loads(sample["json"])
            tensors = load_tensors(sample["safetensors"])
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            raise SkipSample("decode_error", f"not a cached sample: {error}") from error
        if meta.get("cache") != self.cache_digest:
            # a shard of another cache in this one's folder: never train on it silently
            raise StaleCache(f"{sample.get('__url__')}: sample {sample.get('__key__')} belongs to another cache")
        latents = tensors["latent"]  # (V, c, t, h, w)
        view = int(rng.integers(latents.shape[0])) if self.train else 0
        clip = {
            "latent": latents[view],
            "tokens": tensors["tokens"],
            "mask": tensors["mask"],
            "pooled": tensors["pooled"],
            "caption": sample["txt"].decode(),
            "key": sample["__key__"],
            "fps": float(meta["fps"]),
        }
        return int(meta["bucket"]), clip


def collate_cached(samples: list[dict]) -> VideoBatch:
    """Cached clips of one bucket -> a VideoBatch with latents and text (captions padded to the longest)."""
    length = max(s["tokens"].shape[0] for s in samples)
    texts = [TextCond(s["tokens"][None], s["mask"][None], s["pooled"][None]).padded(length) for s in samples]
    return VideoBatch(
        video=None,
        captions=[s["caption"] for s in samples],
        keys=[s["key"] for s in samples],
        fps=torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
        latents=torch.stack([s["latent"] for s in samples]),
        text=TextCond(*(torch.cat([getattr(t, name) for t in texts]) for name in ("tokens", "mask", "pooled"))),
    )
