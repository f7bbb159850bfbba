"""Shards: expand brace patterns to local paths, and read their members strictly."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import braceexpand

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """'data/train-{000000..000003}.tar.gz' (or a list of such) -> the list of local shard paths.

    Only local files are accepted: webdataset would run `pipe:` URLs through a shell, so any URL
    scheme is refused here with a clear message rather than handed on.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    shards = [path for pattern in patterns for path in braceexpand.braceexpand(pattern)]
    if not shards:
        raise ValueError(f"no shards in {spec!r}")
    for shard in shards:
        if _SCHEME.match(shard) and not shard.startswith("file:"):
            raise ValueError(f"shard {shard!r}: only local paths are supported")
    shards = [shard.removeprefix("file:") for shard in shards]
    if not any(Path(shard).is_file() for shard in shards):
        raise FileNotFoundError(f"none of the {len(shards)} shards in {spec!r} exists (first: {shards[0]})")
    return shards


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
