"""Write WebDataset shards: tar files of samples `<key>.<ext>`, byte-for-byte reproducible."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path


def write_shard(path: Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write (key, {ext: bytes}) samples to one tar (gzip-compressed when `path` ends in .gz).

    Member metadata (time, owner, mode) and the gzip header are fixed, so the same samples always give
    the same bytes. The file appears under its name only once complete (written beside it, then renamed).
    Returns the number of samples.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    count = 0
    with (
        open(partial, "wb") as raw,
        _maybe_gzip(raw, path.suffix == ".gz") as stream,
        tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for key, members in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            for extension in sorted(members):
                data = members[extension]
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            count += 1
    partial.replace(path)
    return count


def _maybe_gzip(raw, compress: bool):
    # filename="" and mtime=0 keep the gzip header free of anything that changes between runs
    return gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) if compress else _Unclosed(raw)


class _Unclosed:
    """The raw file, as a context manager that leaves closing to its owner."""

    def __init__(self, raw):
        self.raw = raw

    def __enter__(self):
        return self.raw

    def __exit__(self, *exc):
        return False
