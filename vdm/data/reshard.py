"""A training stream's position saved under one layout (ranks x loader workers) carried over to another.

Under an unchanged layout a stream resumes exactly (vdm.data.stream). Under a changed one each epoch's
shards are split over a different number of worker slots, so an old slot's position means nothing to the
new slots. What carries over is the promise of a pass (an epoch of a source): each of its samples is trained
on once.

Per source, let P be the latest pass any old slot had begun. Everything of passes up to P that the old
slots had not trained on is gathered as units: the rest of the shard each slot was reading, the shards after
it in its lists up to pass P, the units of a backlog it still held (from an earlier change), and the raw
samples in its shuffle buffer and unfinished batches (read again from their shards, by index). The units
are dealt out in turn to the new slots as a backlog, read before their own passes, which start at P + 1
with the new layout's split. So within every pass begun no sample trained on comes again and none is lost;
the order differs from the uninterrupted run's, and re-read samples get new random clip starts and crops.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from vdm.data.stream import Source, epoch_order, numbered_references


def saved_layout(ranks: Sequence[dict]) -> tuple[int, int] | None:
    """(ranks, loader workers per rank) that StreamTracker states were recorded with; None if nothing was trained."""
    workers = {state.get("num_workers") for state in ranks if state and state.get("positions")}
    if not workers:
        return None
    if len(workers) > 1:
        raise ValueError(f"the ranks' stream positions disagree on the number of loader workers: {sorted(workers)}")
    return len(ranks), workers.pop()


def carry_over(
    ranks: Sequence[dict], sources: Sequence[Source], *, seed: int, world_size: int, num_workers: int
) -> list[dict]:
    """StreamTracker states for `world_size` ranks of `num_workers` loader workers each, continuing the passes
    of the training streams whose per-rank states are `ranks` (the same states if the layout is unchanged)."""
    layout = saved_layout(ranks)
    if layout is None:
        return [{} for _ in range(world_size)]  # nothing trained: a fresh start
    if layout == (world_size, num_workers):
        return list(ranks)
    old_workers = layout[1]
    positions: list[dict | None] = [None] * (len(ranks) * old_workers)
    for rank, state in enumerate(ranks):
        for worker, position in (state or {}).get("positions", {}).items():
            positions[rank * old_workers + int(worker)] = position
    new = reshard(positions, sources, seed=seed, slots=world_size * num_workers)
    return [
        {
            "batches": 0,
            "num_workers": num_workers,
            "positions": {w: new[r * num_workers + w] for w in range(num_workers)},
        }
        for r in range(world_size)
    ]


def reshard(positions: Sequence[dict | None], sources: Sequence[Source], *, seed: int, slots: int) -> list[dict]:
    """Positions of `slots` worker slots continuing the passes of the old slots' `positions` (None: not started).

    Slot k is worker w of rank r: k = r * workers_per_rank + w, as in WorkerStream.
    """
    old_slots = len(positions)
    numbered = []
    for k, position in enumerate(positions):
        if position and "backlog" not in position:  # written by an earlier vdm

            def shard_numbers(source, epoch, k=k):
                return epoch_order(seed, source, len(sources[source].shards), epoch, True)[k::old_slots]

            position = numbered_references(position, shard_numbers)
        numbered.append(position or None)
    cursors, backlogs = [], []
    for source, spec in enumerate(sources):
        units, latest = unread(numbered, source, len(spec.shards), seed)
        cursors.append([latest + 1, 0, 0])
        backlogs.append([units[m::slots] for m in range(slots)])
    return [
        {
            "cursors": [list(c) for c in cursors],
            "drawn": 0,
            "emitted": 0,
            "buffer": [],
            "pending": {},
            "backlog": [backlog[m] for backlog in backlogs],
        }
        for m in range(slots)
    ]


def unread(positions: Sequence[dict | None], source: int, num_shards: int, seed: int) -> tuple[list[list], int]:
    """Backlog units [epoch, shard, first sample index, only these indices or None] of what the slots did not
    train on of `source` in the passes up to the latest any of them began; and that pass (-1: none began)."""
    slots = len(positions)
    cursors = [position["cursors"][source] if position else [0, 0, 0] for position in positions]
    # a cursor at the start of pass e has read nothing of it: the latest pass it began is e - 1
    latest = max(epoch - 1 if (index, start) == (0, 0) else epoch for epoch, index, start in cursors)
    units = []
    for k, (position, (epoch, index, start)) in enumerate(zip(positions, cursors)):
        if position:
            units += [list(unit) for unit in position["backlog"][source]]
            held = [*position["buffer"], *(entry[1:] for es in position["pending"].values() for entry in es)]
            by_shard = defaultdict(list)
            for held_source, held_epoch, shard, sample in held:
                if held_source == source:
                    by_shard[(held_epoch, shard)].append(sample)
            units += [[e, shard, 0, sorted(samples)] for (e, shard), samples in by_shard.items()]
        for q in range(epoch, latest + 1):
            mine = epoch_order(seed, source, num_shards, q, True)[k::slots]
            first = index if q == epoch else 0
            units += [[q, mine[n], start if (q, n) == (epoch, index) else 0, None] for n in range(first, len(mine))]
    units.sort(key=lambda unit: (unit[0], unit[1], unit[2], unit[3] or []))
    return units, latest
