"""Counts of skipped samples by reason, shared by the loader's worker processes, and the bad-data limit."""

from __future__ import annotations

import logging
import multiprocessing

log = logging.getLogger(__name__)

REASONS = ("decode_error", "too_short", "missing_video", "missing_caption", "no_bucket", "shard_error")


class TooMuchBadData(RuntimeError):
    """More of the data than configured cannot be used: a sign of a broken dataset, not of a few bad files."""


class SkipCounter:
    """Samples (or rest-of-shards) the pipeline could not use, counted by reason, out of samples seen.

    The counts live in shared memory created before the loader starts its workers, so the main process
    reads the totals of all workers. Once `min_samples` have been seen, a skipped share above
    `max_fraction` raises TooMuchBadData (in a worker, the loader re-raises it in the training process).
    """

    def __init__(self, max_fraction: float = 1.0, min_samples: int = 200):
        self._counts = multiprocessing.Array("q", len(REASONS) + 1)  # the last slot counts samples seen
        self.max_fraction, self.min_samples = max_fraction, min_samples

    def add(self, reason: str, what: str, error: object = None) -> None:
        index = REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[index] += 1
            if reason != "shard_error":
                self._counts[-1] += 1
            skipped, seen = sum(self._counts[:-1]), self._counts[-1]
        log.warning("skipped %s (%s): %s", what, reason, error)
        if seen >= self.min_samples and skipped > self.max_fraction * seen:
            raise TooMuchBadData(
                f"{skipped} of {seen} samples skipped ({self.counts()}), more than "
                f"data.max_skip_fraction={self.max_fraction}: check the shards"
            )

    def add_seen(self) -> None:
        with self._counts.get_lock():
            self._counts[-1] += 1

    def counts(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(REASONS, self._counts[:-1]))

    def total(self) -> int:
        return sum(self.counts().values())
