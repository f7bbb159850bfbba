"""Evaluation work split over ranks, with results that do not depend on the number of processes."""

from __future__ import annotations


def spread(count: int, world_size: int, rank: int) -> list[int | None]:
    """The items of `rank` when `count` items go round-robin to `world_size` ranks: item round * world_size + rank
    in each round, or None where that is past the end.

    Every rank gets the same number of rounds, so collective work stays in step: under sharded parameters (FSDP2,
    ZeRO-3) every forward gathers them from all ranks, and a rank with None does a spare forward and drops it.
    """
    rounds = -(-count // world_size)
    return [i if (i := r * world_size + rank) < count else None for r in range(rounds)]
