"""Counts of skipped samples by reason, shared by the loader's worker processes."""

from __future__ import annotations

import logging
import multiprocessing

log = logging.getLogger(__name__)

REASONS = ("decode_error", "too_short", "missing_video", "missing_caption", "shard_error")


class SkipCounter:
    """Samples (or rest-of-shards) the pipeline could not use, counted by reason.

    The counts live in shared memory created before the loader starts its workers, so the main
    process reads the totals of all workers.
    """

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(REASONS))

    def add(self, reason: str, what: str, error: object = None) -> None:
        index = REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[index] += 1
        log.warning("skipped %s (%s): %s", what, reason, error)

    def counts(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(REASONS, self._counts[:]))

    def total(self) -> int:
        return sum(self.counts().values())
