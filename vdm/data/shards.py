"""Shards: expand brace patterns into shard URLs, open them, and read their samples strictly."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import braceexpand

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_PREFIX = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/key.ext.gz" -> ("dir/key", "ext.gz"), as webdataset

# Remote storage read through fsspec. Never `pipe:` (webdataset runs those through a shell).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "http", "https")


def expand_shards(
    spec: str | Sequence[str], remote_schemes: Sequence[str] = REMOTE_SCHEMES, must_exist: bool = True
) -> list[str]:
    """'data/train-{000000..000003}.tar.gz' (or a list of such) -> the list of shard URLs.

    Local paths are accepted, and URLs whose scheme is in `remote_schemes`; anything else (`pipe:`,
    an unknown scheme) is refused with a clear message rather than handed on. `must_exist`: local shards of
    which none exists are refused (a mistyped pattern).
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    shards = [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]
    if not shards:
        raise ValueError(f"no shards in {spec!r}")
    for shard in shards:
        prefix = _PREFIX.match(shard)  # "pipe:", "s3://", ...
        if prefix and shard_scheme(shard) not in (*remote_schemes, "file"):
            raise ValueError(
                f"shard {shard!r}: {prefix.group(0)!r} is not allowed: use a local path or a URL "
                f"with one of the schemes {', '.join(remote_schemes)}"
            )
    shards = [shard.removeprefix("file://") for shard in shards]
    local = [shard for shard in shards if shard_scheme(shard) is None]
    if must_exist and len(local) == len(shards) and not any(Path(shard).is_file() for shard in shards):
        raise FileNotFoundError(f"none of the {len(shards)} shards in {spec!r} exists (first: {shards[0]})")
    return shards


def shard_scheme(url: str) -> str | None:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def open_shard(url: str) -> BinaryIO:
    if shard_scheme(url) is None:
        return open(url, "rb")
    import fsspec  # remote storage only; its protocol packages (s3fs, gcsfs, ...) are the user's to install

    return fsspec.open(url, "rb").open()


class TruncatedShard(Exception):
    """The archive stops before its end-of-archive marker."""


def iter_tar_files(stream: BinaryIO, name: str) -> Iterator[dict]:
    """Members of a (possibly gzipped) tar stream as {'fname', 'data'}, in order.

    Python's tarfile ends iteration silently when an archive is cut inside a header block; a shard cut
    there would lose its tail unnoticed. A complete archive ends with a zero block, so after the last
    member we check that one was read, and raise TruncatedShard otherwise.
    """
    archive = tarfile.open(fileobj=stream, mode="r|*")
    for member in archive:
        if member.isreg():
            yield {"fname": member.name, "data": archive.extractfile(member).read()}
        archive.members = []  # stream mode keeps every TarInfo otherwise
    if archive.fileobj.tell() - archive.offset < tarfile.BLOCKSIZE:
        raise TruncatedShard(f"{name}: archive ends inside a header at byte {archive.offset}")


def iter_shard_samples(url: str) -> Iterator[dict]:
    """Samples of one shard, in order: {'__key__', '__url__', '__index__', <ext>: bytes, ...}.

    A sample is the run of consecutive members that share a key. Member bytes are returned raw: nothing
    here decodes, let alone unpickles, what a shard holds. Errors (a missing shard, a truncated or corrupt
    archive) propagate after the complete samples; the sample being read when one happens is dropped.
    """
    with open_shard(url) as stream:
        sample: dict | None = None
        index = 0
        for member in iter_tar_files(stream, url):
            match = _MEMBER.match(member["fname"])
            if match is None:
                continue
            key, extension = match.group(1), match.group(2).lower()
            if sample is not None and key != sample["__key__"]:
                yield sample
                index += 1
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": url, "__index__": index}
            sample[extension] = member["data"]
        if sample is not None:
            yield sample
