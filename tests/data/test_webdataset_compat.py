"""vdm's shards are WebDataset shards: `webdataset` reads what vdm writes, and vdm reads what `webdataset` writes,
sample for sample and byte for byte (real mp4 files from the bundled moving-digits shards)."""

from __future__ import annotations

from pathlib import Path

import webdataset

from vdm.data.shard_writer import write_shard
from vdm.data.shards import iter_shard_samples

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = sorted((ROOT / "data" / "moving_digits").glob("*.tar.gz"))
WDS_KEYS = ("__url__", "__local_path__")  # webdataset's bookkeeping, not the sample's members
VDM_KEYS = ("__url__", "__index__")


def read_with_webdataset(url: str) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in WDS_KEYS} for s in webdataset.WebDataset(url, shardshuffle=False)]


def read_with_vdm(url: str) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in VDM_KEYS} for s in iter_shard_samples(url)]


def members(samples: list[dict]) -> list[tuple[str, dict[str, bytes]]]:
    return [(s["__key__"], {k: v for k, v in s.items() if k != "__key__"}) for s in samples]


def test_webdataset_reads_the_bundled_shards_as_vdm_does():
    assert len(BUNDLED) == 5
    for shard in BUNDLED:
        ours = read_with_vdm(str(shard))
        assert len(ours) > 0 and all({"mp4", "txt", "json"} <= set(s) for s in ours)
        assert read_with_webdataset(str(shard)) == ours, shard.name


def test_a_shard_vdm_writes_is_the_shard_webdataset_reads(tmp_path):
    samples = members(read_with_vdm(str(BUNDLED[0])))[:6]
    for name in ("plain.tar", "compressed.tar.gz"):
        written = tmp_path / name
        assert write_shard(written, samples) == len(samples)
        assert members(read_with_webdataset(str(written))) == samples, name


def test_vdm_reads_a_shard_webdataset_writes(tmp_path):
    samples = members(read_with_vdm(str(BUNDLED[0])))[:6]
    written = tmp_path / "by-webdataset.tar"
    with webdataset.TarWriter(str(written)) as sink:
        for key, files in samples:
            sink.write({"__key__": key, **files})
    assert members(read_with_vdm(str(written))) == samples
