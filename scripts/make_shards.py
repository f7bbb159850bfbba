"""Write WebDataset shards from a folder of captioned videos and images, or from a CSV / JSONL caption file.

Each sample is `<key>.<ext>` (the media bytes as they are, never re-encoded) + `<key>.txt` (the caption)
+ `<key>.json` (fps, frames, width, height, duration and source for videos; width, height, frames=1 and
source for images). The key is a hash of the file's path relative to the input root, so it is stable.

    python scripts/make_shards.py --input DIR --out DIR [--prefix shard] [--shard-size-mb 1000] [--compress]
    python scripts/make_shards.py --captions captions.{csv,jsonl} --out DIR

--input: every .mp4 .webm .mkv .mov .avi .jpg .jpeg .png .webp below DIR, captioned by the .txt beside it
with the same stem. --captions: a CSV with a `path,caption` header, or JSONL lines {"path": ..., "caption":
...}; relative paths are relative to the caption file's folder.

The output is a pure function of the inputs and options: inputs are sorted by relative path and the shard
boundaries are planned from file sizes before any file is read, so the same inputs always give the same
shards, byte for byte. Stopped and started again, it keeps the shards that are complete (a shard appears
under its final name only once written) and redoes the rest. A file it cannot use (undecodable, missing or
empty caption) is left out and listed with the reason in OUT/report.json; its shard keeps its planned
place. One --out folder holds one dataset.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from vdm.data.clips import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS  # what the reader decodes
from vdm.data.shard_writer import write_shard
from vdm.data.video import probe

# the media the pipeline reads (vdm/data); stored under these extensions, with jpeg as jpg
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
TAR_BLOCK = 512
JSON_ESTIMATE = 160  # bytes of metadata besides the source path; only used to plan shard sizes
REPORT = "report.json"


@dataclass(frozen=True)
class Input:
    path: Path  # where to read the media
    source: str  # path relative to the input root: names the sample (its key) and orders the dataset
    caption: str | None  # None when there is no caption at all


@dataclass(frozen=True)
class Planned:
    input: Input
    key: str
    extension: str  # as stored in the shard: lowercase, jpeg -> jpg
    size: int  # bytes the sample is expected to take in the tar


@dataclass(frozen=True)
class Shard:
    name: str
    samples: tuple[Planned, ...]

    @property
    def digest(self) -> str:
        """Names what the shard was planned to hold, so a resumed run can tell it planned the same."""
        text = "".join(f"{p.key} {p.size} {json.dumps(p.input.caption)}\n" for p in self.samples)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


class PlanMismatch(Exception):
    """OUT holds shards planned from other inputs or options: finishing them would mix two plans."""


# ---------------------------------------------------------------------------------------------- inputs


def find_inputs(root: Path) -> tuple[list[Input], list[tuple[str, str]]]:
    """Media files below `root`, captioned by the .txt beside each -> (inputs, [(source, reason)] rejected)."""
    inputs, rejected = [], []
    for path in sorted(root.rglob("*")):
        if not (path.suffix.lower().lstrip(".") in MEDIA_EXTENSIONS and path.is_file()):
            continue
        source = path.relative_to(root).as_posix()
        caption_file = path.with_suffix(".txt")
        try:
            caption = _decode_caption(caption_file.read_bytes()) if caption_file.is_file() else None
        except (OSError, UnicodeDecodeError) as error:
            rejected.append((source, f"cannot read caption: {error}"))
            continue
        inputs.append(Input(path, source, caption))
    return inputs, rejected


def read_caption_file(file: Path) -> tuple[list[Input], list[tuple[str, str]]]:
    """A CSV (header `path,caption`) or JSONL ({"path", "caption"} per line) -> (inputs, rejected)."""
    suffix = file.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(file)
    elif suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(file)
    else:
        raise ValueError(f"{file}: captions must be a .csv or .jsonl file")
    inputs, rejected, seen = [], [], set()
    for written_path, caption in rows:
        # the path as written, normalized, names the sample: the same list gives the same keys anywhere
        source = Path(os.path.normpath(written_path)).as_posix()
        path = file.parent / written_path
        if source in seen:
            rejected.append((source, "listed more than once (the first entry is used)"))
        elif path.suffix.lower().lstrip(".") not in MEDIA_EXTENSIONS:
            rejected.append((source, f"unsupported file type {path.suffix!r}"))
        elif not path.is_file():
            rejected.append((source, "file not found"))
        else:
            inputs.append(Input(path, source, caption))
        seen.add(source)
    return inputs, rejected


def _csv_rows(file: Path) -> Iterator[tuple[str, str | None]]:
    with open(file, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        if not {"path", "caption"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{file}: the first line must be a header with columns path,caption")
        for row in reader:
            if row["path"]:
                yield row["path"], row["caption"]


def _jsonl_rows(file: Path) -> Iterator[tuple[str, str | None]]:
    with open(file, encoding="utf-8-sig") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{file}:{number}: not JSON ({error})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise ValueError(f"{file}:{number}: expected an object with a string 'path'")
            caption = entry.get("caption")
            yield entry["path"], caption if isinstance(caption, str) else None


def _decode_caption(data: bytes) -> str:
    # utf-8-sig: a byte-order mark some editors write is not part of the caption
    return data.decode("utf-8-sig")


# ---------------------------------------------------------------------------------------------- planning


def sample_key(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def stored_extension(path: Path) -> str:
    extension = path.suffix.lower().lstrip(".")
    return "jpg" if extension == "jpeg" else extension


def tar_size(*member_sizes: int) -> int:
    """Bytes that members of these sizes take in a tar: a header block each, data padded to whole blocks."""
    return sum(TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK for size in member_sizes)


def plan_sizes(sizes: list[int], limit: float) -> list[range]:
    """Split samples of these sizes, in order, into contiguous runs of at most `limit` bytes (one sample at least)."""
    runs, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            runs.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def plan_shards(
    inputs: list[Input], shard_bytes: float, prefix: str, suffix: str
) -> tuple[list[Shard], list[tuple[str, str]]]:
    """Captioned inputs, sorted by source, in shards -> (shards, rejected). Reads only captions and file sizes."""
    planned, rejected = [], []
    for item in sorted(inputs, key=lambda i: i.source):
        caption = item.caption.strip() if item.caption is not None else None
        if not caption:
            rejected.append((item.source, "missing caption" if caption is None else "empty caption"))
            continue
        try:
            media_size = item.path.stat().st_size
        except OSError as error:
            rejected.append((item.source, f"cannot read file: {error}"))
            continue
        json_size = JSON_ESTIMATE + len(item.source.encode())
        size = tar_size(media_size, len(caption.encode()), json_size)
        planned.append(
            Planned(Input(item.path, item.source, caption), sample_key(item.source), stored_extension(item.path), size)
        )
    runs = plan_sizes([p.size for p in planned], shard_bytes)
    shards = [
        Shard(f"{prefix}-{index:06d}{suffix}", tuple(planned[run.start : run.stop])) for index, run in enumerate(runs)
    ]
    return shards, rejected


# ---------------------------------------------------------------------------------------------- reading


def read_metadata(path: str, source: str, extension: str) -> tuple[dict | None, str | None]:
    """(metadata, None) for a readable file, (None, reason) otherwise. Runs in the worker processes."""
    is_video = extension in VIDEO_EXTENSIONS
    try:
        meta = video_metadata(path) if is_video else image_metadata(path)
    except Exception as error:
        # whatever a decoder raises on one bad file is reported, not allowed to stop a run over many files
        return None, f"{'cannot decode video' if is_video else 'cannot read image'}: {error}"
    return meta | {"source": source}, None


def video_metadata(path: str) -> dict:
    # vdm's own probe decodes the first frame (which catches files whose header opens but whose data is broken)
    # and gives the size as displayed: a phone video stored 1920x1080 with a 90 degree rotation is 1080x1920, and
    # the pipeline picks a clip's bucket from this json
    info = probe(Path(path).read_bytes())
    frames = info.num_frames or _count_packets(path)
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = frames / info.fps if info.fps else None
    return {
        "fps": info.fps,
        "frames": frames,
        "width": info.width,
        "height": info.height,
        "rotation": info.rotation,
        "duration": round(duration, 6) if duration is not None else None,
    }


def _count_packets(path: str) -> int:
    # containers such as webm and mkv do not declare a frame count; one packet holds one video frame
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def image_metadata(path: str) -> dict:
    with Image.open(path) as image:
        image.load()  # the header alone does not show a truncated or corrupt file
        width, height = image.size
    return {"width": width, "height": height, "frames": 1}


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """`workers` processes (None: work in this one). Leaving the `with` (done, error, Ctrl-C) stops them at once."""
    if workers <= 1:
        yield None
        return
    # started before any progress bar: forking a process that runs threads can copy a lock held by one of them
    with multiprocessing.Pool(workers, initializer=_worker_signals) as pool:
        yield pool


def in_order(
    pool: multiprocessing.pool.Pool | None, function: Callable, calls: Iterable[tuple], ahead: int
) -> Iterator:
    """function(*args) for each args in `calls`, in order, computed in the pool's processes.

    At most `ahead` calls run ahead of the consumer, so memory stays bounded however many files there are.
    """
    if pool is None:
        yield from itertools.starmap(function, calls)
        return
    window: collections.deque = collections.deque()
    for args in calls:
        window.append(pool.apply_async(function, args))
        if len(window) >= ahead:
            yield window.popleft().get()
    while window:
        yield window.popleft().get()


def _worker_signals():
    # Ctrl-C reaches every process of the group; only the main process should act on it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the pool stops its workers with SIGTERM: they must die then, not run main()'s handler inherited by fork
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------- writing


def make_shards(
    inputs: list[Input],
    out: Path,
    *,
    prefix: str = "shard",
    shard_bytes: float = 1e9,
    workers: int = 1,
    compress: bool = False,
    rejected: Iterable[tuple[str, str]] = (),
    progress: bool = True,
) -> dict:
    """Write the shards of `inputs` into `out` (keeping shards already complete) and return the report.

    `rejected`: (source, reason) of inputs found unusable before this call, listed in the report.
    Raises PlanMismatch when `out` holds shards planned from other inputs or options.
    """
    out.mkdir(parents=True, exist_ok=True)
    shards, caption_rejects = plan_shards(inputs, shard_bytes, prefix, ".tar.gz" if compress else ".tar")
    previous = read_previous_report(out, prefix)
    check_resumable(out, prefix, shards, previous)
    for shard in shards:
        (out / (shard.name + ".partial")).unlink(missing_ok=True)  # left by a run that was stopped

    complete = {shard.name for shard in shards if (out / shard.name).is_file()}
    report = new_report(prefix, shards, complete, previous)
    report["unusable"] = [{"source": s, "reason": r, "shard": None} for s, r in [*rejected, *caption_rejects]]
    report["unusable"] += [u for u in previous.get("unusable", []) if u.get("shard") in complete]
    save_report(out, report)

    pending = [shard for shard in shards if shard.name not in complete]
    total = sum(len(shard.samples) for shard in pending)
    calls = ((str(p.input.path), p.input.source, p.extension) for shard in pending for p in shard.samples)
    with worker_pool(min(workers, total)) as pool, progress_bar(total if progress else 0) as bar:
        # one stream of results across all pending shards, so the workers never wait at a shard boundary
        results = counted(in_order(pool, read_metadata, calls, ahead=16 * workers), bar)
        for shard in pending:
            failures: list[tuple[str, str]] = []
            samples = assemble(shard, itertools.islice(results, len(shard.samples)), failures)
            count = write_atomically(out / shard.name, samples)
            record_shard(report, shard, count, failures)
            save_report(out, report)
            say(f"{shard.name}: {count} samples, {len(failures)} unusable")
    return report


def assemble(shard: Shard, metadata: Iterable[tuple], failures: list) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The (key, {ext: bytes}) samples of a shard; the ones that cannot be used go to `failures`."""
    for planned, (meta, reason) in zip(shard.samples, metadata):
        if meta is None:
            failures.append((planned.input.source, reason))
            continue
        try:
            media = planned.input.path.read_bytes()
        except OSError as error:
            failures.append((planned.input.source, f"cannot read file: {error}"))
            continue
        yield (
            planned.key,
            {
                planned.extension: media,
                "txt": planned.input.caption.encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            },
        )


def write_atomically(path: Path, samples: Iterable) -> int:
    try:
        return write_shard(path, samples)
    except BaseException:
        # no half-written shard is left behind; a run killed outright can leave one, and the next run deletes it
        path.with_name(path.name + ".partial").unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def progress_bar(total: int):
    """A progress bar on stderr (tqdm when installed, else a line every 5%); none when total is 0."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield _ProgressLines(total)
        return
    with tqdm(total=total, disable=not total, unit="file", file=sys.stderr, mininterval=1.0) as bar:
        yield bar


class _ProgressLines:
    def __init__(self, total: int):
        self.total, self.done, self.every = total, 0, max(1, total // 20)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.total and (self.done % self.every == 0 or self.done == self.total):
            print(f"{self.done}/{self.total} files", file=sys.stderr)


def counted(items: Iterator, bar) -> Iterator:
    for item in items:
        bar.update()
        yield item


def say(message: str) -> None:
    """A line on stderr that does not break a progress bar being drawn there."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=sys.stderr)
    else:
        tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- report


def read_previous_report(out: Path, prefix: str) -> dict:
    """The report a previous run left in `out`, if it was about the same prefix."""
    try:
        report = json.loads((out / REPORT).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) and report.get("prefix") == prefix else {}


def check_resumable(out: Path, prefix: str, shards: list[Shard], previous: dict) -> None:
    planned = {shard.name: shard.digest for shard in shards}
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar(\.gz)?")
    strays = sorted(p.name for p in out.iterdir() if pattern.fullmatch(p.name) and p.name not in planned)
    recorded = {entry["name"]: entry.get("plan") for entry in previous.get("shards", [])}
    changed = sorted(
        name for name, digest in planned.items() if (out / name).is_file() and recorded.get(name, digest) != digest
    )
    if strays or changed:
        names = strays + changed
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise PlanMismatch(
            f"{out} holds shards planned from other inputs or options ({listed}): write to a new --out, "
            "or delete the old shards and report.json"
        )


def new_report(prefix: str, shards: list[Shard], complete: set[str], previous: dict) -> dict:
    recorded = {entry["name"]: entry.get("samples") for entry in previous.get("shards", [])}
    return {
        "prefix": prefix,
        "samples_written": 0,
        "samples_total": None,
        "shards_written": 0,
        "shards_skipped_complete": len(complete),
        "shards": [
            {
                "name": shard.name,
                "plan": shard.digest,
                "planned": len(shard.samples),
                # a shard completed by an earlier run: its count is known only if that run recorded it
                "samples": recorded.get(shard.name) if shard.name in complete else None,
                "status": "complete" if shard.name in complete else "pending",
            }
            for shard in shards
        ],
        "unusable": [],
    }


def record_shard(report: dict, shard: Shard, count: int, failures: list[tuple[str, str]]) -> None:
    entry = next(entry for entry in report["shards"] if entry["name"] == shard.name)
    entry["samples"], entry["status"] = count, "written"
    report["samples_written"] += count
    report["shards_written"] += 1
    report["unusable"] += [{"source": s, "reason": r, "shard": shard.name} for s, r in failures]


def finish_report(report: dict) -> None:
    counts = [entry["samples"] for entry in report["shards"]]
    report["samples_total"] = sum(counts) if None not in counts else None
    report["unusable"].sort(key=lambda u: u["source"])


def save_report(out: Path, report: dict) -> None:
    # written after every shard, so a resumed run still knows the counts and failures of the finished ones
    temporary = out / (REPORT + ".partial")
    temporary.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    temporary.replace(out / REPORT)


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="folder of media files with a .txt caption beside each")
    source.add_argument("--captions", type=Path, help="CSV (path,caption) or JSONL file of paths and captions")
    parser.add_argument("--out", type=Path, required=True, help="folder for the shards and report.json")
    parser.add_argument("--prefix", default="shard", help="shards are PREFIX-000000.tar, ...")
    parser.add_argument("--shard-size-mb", type=float, default=1000, help="target shard size (1 MB = 10^6 bytes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading the files")
    parser.add_argument("--compress", action="store_true", help="write .tar.gz instead of .tar")
    args = parser.parse_args(argv)
    if args.shard_size_mb <= 0 or args.workers < 1:
        parser.error("--shard-size-mb must be > 0 and --workers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a plain `kill` then unwinds like Ctrl-C: the workers stop and no partial shard is left
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def run(args: argparse.Namespace) -> int:
    try:
        if args.input is not None:
            if not args.input.is_dir():
                raise ValueError(f"--input {args.input} is not a folder")
            inputs, rejected = find_inputs(args.input)
        else:
            inputs, rejected = read_caption_file(args.captions)
        report = make_shards(
            inputs,
            args.out,
            prefix=args.prefix,
            shard_bytes=args.shard_size_mb * 1e6,
            workers=args.workers,
            compress=args.compress,
            rejected=rejected,
        )
    except (ValueError, OSError, PlanMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to finish (complete shards are kept)", file=sys.stderr)
        return 130
    finish_report(report)
    if report["samples_total"] == 0:
        remove_empty_shards(args.out, report)
    save_report(args.out, report)
    print_summary(args.out, report)
    return 1 if report["samples_total"] == 0 else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def remove_empty_shards(out: Path, report: dict) -> None:
    # nothing usable at all: empty shards would only be mistaken for a dataset, and block a rerun's plan
    for entry in report["shards"]:
        (out / entry["name"]).unlink(missing_ok=True)
    report["shards"], report["shards_written"], report["shards_skipped_complete"] = [], 0, 0


def print_summary(out: Path, report: dict) -> None:
    unusable = report["unusable"]
    for entry in unusable:
        print(f"unusable: {entry['source']}: {entry['reason']}")
    total = report["samples_total"]
    print(
        f"wrote {report['samples_written']} samples in {report['shards_written']} shards to {out}; "
        f"{report['shards_skipped_complete']} shards were already complete; "
        f"{total if total is not None else 'unknown'} samples in all; {len(unusable)} files unusable; "
        f"report: {out / REPORT}"
    )
    if total == 0:
        why = f"all {len(unusable)} files are unusable (reasons above)" if unusable else "no media files were found"
        print(f"error: no sample could be written: {why}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
