"""What one reader's reads skipped, retried and took from the cache (`ReadStats`, owned by a `ShardReader`).

With ``data.on_corrupt: skip`` every skipped sample position is counted once per reader, however
often it is read again (later epochs, lockstep refills), with its shard's first problem; the
training loop sums its worker's counts over ranks into ``data/*`` metrics.
"""

from __future__ import annotations

import threading

import numpy as np


class ReadStats:
    """Cumulative counts of one reader. Thread-safe: a worker's prefetch thread reads training
    batches while its main thread validates through the same reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retries = 0
        self._cache = {"hits": 0, "misses": 0, "evicted": 0}
        # Which sample positions of which shards were skipped: a bitmap per damaged shard, so a
        # sample skipped again in a later epoch (or a refill pass) is counted once.
        self._skipped: dict[str, np.ndarray] = {}
        self._problems: dict[str, str] = {}

    def count_retry(self, _err: BaseException | None = None) -> None:
        """A transient read error that is being retried (an `on_retry` of the retry policy)."""
        with self._lock:
            self._retries += 1

    def count_cache(self, event: str) -> None:
        """A cache ``hits``, ``misses`` (a download) or ``evicted`` entry."""
        with self._lock:
            self._cache[event] += 1

    def record_skip(self, url: str, shard_samples: int, first: int, stop: int, problem: str) -> None:
        """Samples [first, stop) of the shard at ``url`` were skipped because of ``problem``."""
        with self._lock:
            bitmap = self._skipped.setdefault(url, np.zeros(max(shard_samples, stop), dtype=bool))
            bitmap[first:stop] = True
            self._problems.setdefault(url, problem)

    @property
    def read_retries(self) -> int:
        return self._retries

    @property
    def cache_hits(self) -> int:
        return self._cache["hits"]

    @property
    def cache_misses(self) -> int:
        return self._cache["misses"]

    @property
    def cache_evicted(self) -> int:
        return self._cache["evicted"]

    @property
    def skipped_samples(self) -> int:
        with self._lock:
            return int(sum(int(bitmap.sum()) for bitmap in self._skipped.values()))

    @property
    def skipped_shards(self) -> dict[str, str]:
        """Shard URL -> its first problem, for every shard with skipped samples."""
        with self._lock:
            return dict(self._problems)
