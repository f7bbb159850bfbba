"""The samples one loader worker of one rank produces, as a pure function of (seed, rank, worker, position).

Stages: per source, shards in an order fixed per epoch -> mixing of sources by weight -> a shuffle
buffer of raw samples -> decoding into clips -> one pending batch per bucket.
No stage keeps a random generator between samples: every draw comes from a generator seeded with
(seed, stage, rank, worker, counter). So the position of a stream is a few counters plus references
(source, epoch, shard, sample index; the shard numbered in its source's list) to the raw samples held in
the shuffle buffer and in the pending batches, and a stream restored from a position yields exactly what
the original would have. A position saved under another layout (ranks x workers) is carried over by
vdm.data.reshard: it hands each worker a backlog of what the old layout left unread in its passes.
"""

from __future__ import annotations

import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vdm.data.clips import ClipMaker, SkipSample
from vdm.data.shards import TruncatedShard, iter_shard_samples
from vdm.data.skips import SkipCounter, TooMuchBadData

# stage tags in the seeds, so that the stages draw independent numbers
SHARD_ORDER, MIX, SHUFFLE, DECODE = 1, 2, 3, 4
# what reading a shard can raise when the shard (not the code) is at fault
SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, TruncatedShard)


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture: its shards and its share of the samples."""

    shards: tuple[str, ...]
    weight: float = 1.0


def rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, *parts])


def epoch_order(seed: int, source: int, num_shards: int, epoch: int, resampled: bool) -> list[int]:
    """The shard numbers of `source` in the order of `epoch`; worker slot k of S reads order[k::S]."""
    if not resampled:
        return list(range(num_shards))
    return rng(seed, SHARD_ORDER, source, epoch).permutation(num_shards).tolist()


def numbered_references(position: dict, shard_numbers) -> dict:
    """A position written before references named shards by number (they held the index in the worker's
    list of that epoch), with its references renumbered; `shard_numbers(source, epoch)` is that list."""

    def renumber(reference):
        source, epoch, index, sample = reference
        return [source, epoch, shard_numbers(source, epoch)[index], sample]

    pending = {b: [[e[0], *renumber(e[1:])] for e in es] for b, es in position.get("pending", {}).items()}
    buffer = [renumber(r) for r in position.get("buffer", [])]
    return position | {"buffer": buffer, "pending": pending, "backlog": [[] for _ in position["cursors"]]}


class WorkerStream:
    """Batches of one worker: lists of clip dicts, with the bucket index, the position after them and the
    references of the raw samples they were made from."""

    def __init__(
        self,
        sources: Sequence[Source],
        clip_maker: ClipMaker,
        *,
        seed: int,
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        resampled: bool,
        shuffle_buffer: int,
        skips: SkipCounter,
        drop_last: bool,
        position: dict | None = None,
    ):
        self.sources, self.clip_maker = list(sources), clip_maker
        self.seed, self.rank, self.worker = seed, rank, worker
        self.slot, self.slots = rank * num_workers + worker, world_size * num_workers  # this worker among all
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.skips, self.drop_last = skips, drop_last
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        position = position or {}
        if position and "backlog" not in position:  # written by an earlier vdm
            position = numbered_references(position, self.shard_list)
        # per source: [epoch, index in this worker's shard list of that epoch, samples read from that shard]
        self.cursors = [list(c) for c in position.get("cursors", [[0, 0, 0] for _ in self.sources])]
        # per source: units another layout left unread, read before the cursor's epoch (see vdm.data.reshard):
        # [epoch, shard number, next sample index, only these sample indices (or None: all from there on)]
        self.backlog = [[list(u) for u in units] for units in position.get("backlog", [[] for _ in self.sources])]
        self.drawn = position.get("drawn", 0)  # raw samples taken from the sources
        self.emitted = position.get("emitted", 0)  # raw samples out of the shuffle buffer
        self.restore_buffer = [tuple(r) for r in position.get("buffer", [])]
        self.restore_pending = {int(b): [tuple(e) for e in es] for b, es in position.get("pending", {}).items()}

    # -- shard order -----------------------------------------------------------------------------
    def shard_list(self, source: int, epoch: int) -> list[int]:
        """This worker's shards (numbers) of `source` in `epoch`: a per-epoch permutation split across all workers."""
        order = epoch_order(self.seed, source, len(self.sources[source].shards), epoch, self.resampled)
        return order[self.slot :: self.slots]

    def read_backlog(self, source: int) -> Iterator[tuple[tuple, dict]]:
        """(reference, raw sample) of the backlog of `source`, unit by unit; each unit records how far it was read."""
        backlog = self.backlog[source]
        while backlog:
            unit = backlog[0]  # [epoch, shard number, next sample index, only these indices or None]
            epoch, shard, _, only = unit
            chosen, last = (None, None) if only is None else (set(only), max(only))
            url = self.sources[source].shards[shard]
            try:
                if last is None or unit[2] <= last:
                    for sample in iter_shard_samples(url):
                        index = sample["__index__"]
                        if index >= unit[2] and (chosen is None or index in chosen):
                            unit[2] = index + 1
                            yield (source, epoch, shard, index), sample
                        if last is not None and index >= last:
                            break
            except SHARD_ERRORS as error:
                self.skips.add("shard_error", f"rest of {url}", error)
            backlog.pop(0)

    def read_source(self, source: int) -> Iterator[tuple[tuple, dict]]:
        """(reference, raw sample) from `source`, from its cursor on; the cursor advances as they are taken."""
        yield from self.read_backlog(source)
        cursor = self.cursors[source]
        read_this_epoch = cursor[1] > 0 or cursor[2] > 0
        while True:
            epoch, shard_index, sample_index = cursor
            numbers = self.shard_list(source, epoch)
            if shard_index >= len(numbers):
                if not self.resampled or not numbers:
                    return
                if not read_this_epoch:
                    raise TooMuchBadData(
                        f"no sample could be read from any of the {len(numbers)} shards of source "
                        f"{source} assigned to rank {self.rank}, worker {self.worker}"
                    )
                cursor[:] = [epoch + 1, 0, 0]
                read_this_epoch = False
                continue
            url = self.sources[source].shards[numbers[shard_index]]
            try:
                for sample in iter_shard_samples(url):
                    if sample["__index__"] < sample_index:
                        continue
                    cursor[2] = sample["__index__"] + 1
                    read_this_epoch = True
                    yield (source, epoch, numbers[shard_index], sample["__index__"]), sample
            except SHARD_ERRORS as error:  # missing, unreadable, truncated: the complete samples stand
                self.skips.add("shard_error", f"rest of {url}", error)
            cursor[:] = [epoch, shard_index + 1, 0]

    def fetch(self, references: Sequence[tuple]) -> dict[tuple, dict]:
        """Read the raw samples that `references` point to again (to restore a position)."""
        wanted = defaultdict(set)
        for source, epoch, shard, sample_index in references:
            wanted[(source, epoch, shard)].add(sample_index)
        found = {}
        for (source, epoch, shard), indices in wanted.items():
            for sample in iter_shard_samples(self.sources[source].shards[shard]):
                if sample["__index__"] in indices:
                    found[(source, epoch, shard, sample["__index__"])] = sample
                if sample["__index__"] >= max(indices):
                    break
        return found

    # -- mixing and shuffling -----------------------------------------------------------------------
    def mixed(self) -> Iterator[tuple[tuple, dict]]:
        readers = [self.read_source(s) for s in range(len(self.sources))]
        live = [True] * len(readers)
        while any(live):
            if len(readers) == 1:
                source = 0
            else:
                draw = rng(self.seed, MIX, self.rank, self.worker, self.drawn).random()
                source = min(int(np.searchsorted(self.cumulative, draw, side="right")), len(readers) - 1)
                if not live[source]:  # a finite source ran out: take the next live one
                    source = next(s for s in range(len(readers)) if live[s])
            try:
                item = next(readers[source])
            except StopIteration:
                live[source] = False
                continue
            self.drawn += 1
            yield item

    def shuffled(self, buffer: list) -> Iterator[tuple[tuple, dict]]:
        """Emit a random element once the buffer holds `shuffle_buffer`; drain it when the sources end."""
        incoming = self.mixed()
        while True:
            if len(buffer) < max(self.shuffle_buffer, 1):
                item = next(incoming, None)
                if item is not None:
                    buffer.append(item)
                    continue
                if not buffer:
                    return
            index = 0
            if self.shuffle_buffer > 1:
                index = int(rng(self.seed, SHUFFLE, self.rank, self.worker, self.emitted).integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            self.emitted += 1
            yield buffer.pop()

    # -- clips and batches ----------------------------------------------------------------------------
    def make_clip(self, ordinal: int, sample: dict) -> tuple[int, dict] | None:
        try:
            return self.clip_maker(sample, rng(self.seed, DECODE, self.rank, self.worker, ordinal))
        except SkipSample as skip:
            self.skips.add(skip.reason, f"{sample.get('__url__')}:{sample.get('__key__')}", skip)
            return None

    def __iter__(self) -> Iterator[tuple[int, list[dict], dict, list[tuple]]]:
        """(bucket index, clips of one batch, position after this batch, the clips' raw-sample references)."""
        buffer, pending = self._restored()
        for reference, sample in self.shuffled(buffer):
            ordinal = self.emitted - 1
            made = self.make_clip(ordinal, sample)
            if made is None:
                continue
            self.skips.add_seen()
            bucket, clip = made
            pending[bucket].append((ordinal, reference, clip))
            if len(pending[bucket]) == self.clip_maker.buckets[bucket].batch_size:
                entries = pending.pop(bucket)
                clips, references = [clip for _, _, clip in entries], [r for _, r, _ in entries]
                yield bucket, clips, self.position(buffer, pending), references
        if not self.drop_last:
            for bucket in sorted(pending):
                yield bucket, [clip for _, _, clip in pending[bucket]], {}, [r for _, r, _ in pending[bucket]]

    def position(self, buffer: list, pending: dict) -> dict:
        return {
            "cursors": [list(c) for c in self.cursors],
            "drawn": self.drawn,
            "emitted": self.emitted,
            "buffer": [list(reference) for reference, _ in buffer],
            "pending": {b: [[o, *r] for o, r, _ in entries] for b, entries in pending.items() if entries},
            "backlog": [[list(unit) for unit in units] for units in self.backlog],
        }

    def _restored(self) -> tuple[list, defaultdict]:
        """The shuffle buffer and pending batches of the position this stream was created with."""
        in_batches = [tuple(e[1:]) for entries in self.restore_pending.values() for e in entries]
        references = self.restore_buffer + in_batches
        samples = self.fetch(references) if references else {}
        buffer = [(r, samples[r]) for r in self.restore_buffer if r in samples]
        pending = defaultdict(list)
        for entries in self.restore_pending.values():
            for ordinal, *reference in entries:
                sample = samples.get(tuple(reference))
                made = self.make_clip(ordinal, sample) if sample is not None else None
                if made is not None:
                    pending[made[0]].append((ordinal, tuple(reference), made[1]))
        return buffer, pending
