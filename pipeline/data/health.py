"""What this process's reads skipped, retried and took from the cache (`data_health()`).

With ``data.on_corrupt: skip`` every skipped sample position is counted once per process,
however often it is read again (later epochs, lockstep refills), with its shard's first problem;
the training loop sums the counts over ranks into ``data/*`` metrics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.cache import cache_stats
from pipeline.data.remote import retry_count


@dataclass
class DataHealth:
    """Snapshot of this process's read problems (cumulative since start or `reset_data_health`)."""

    skipped_samples: int = 0
    skipped_shards: dict[str, str] = field(default_factory=dict)  # shard URL -> first problem
    read_retries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    def metrics(self) -> dict[str, float]:
        """MLflow metric names -> values."""
        return {"data/skipped_samples": float(self.skipped_samples), "data/read_retries": float(self.read_retries),
                "data/cache_hits": float(self.cache_hits), "data/cache_misses": float(self.cache_misses)}


class _SkipLedger:
    """Which sample positions of which shards were skipped: a bitmap per damaged shard, so a
    sample skipped again in a later epoch (or a refill pass) is counted once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._skipped: dict[str, np.ndarray] = {}
        self._problems: dict[str, str] = {}

    def record(self, url: str, shard_samples: int, first: int, stop: int, problem: str) -> None:
        with self._lock:
            bitmap = self._skipped.setdefault(url, np.zeros(max(shard_samples, stop), dtype=bool))
            bitmap[first:stop] = True
            self._problems.setdefault(url, problem)

    def snapshot(self) -> tuple[int, dict[str, str]]:
        with self._lock:
            return int(sum(int(b.sum()) for b in self._skipped.values())), dict(self._problems)

    def clear(self) -> None:
        with self._lock:
            self._skipped.clear()
            self._problems.clear()


_LEDGER = _SkipLedger()


def record_skip(url: str, shard_samples: int, first: int, stop: int, problem: str) -> None:
    """Samples [first, stop) of the shard at ``url`` were skipped because of ``problem``."""
    _LEDGER.record(url, shard_samples, first, stop, problem)


def data_health() -> DataHealth:
    """Skipped samples and shards, read retries and cache hits of this process so far."""
    skipped, shards = _LEDGER.snapshot()
    cache = cache_stats()
    return DataHealth(skipped, shards, retry_count(), cache.hits, cache.misses)


def reset_data_health() -> None:
    from pipeline.data import cache, remote

    _LEDGER.clear()
    remote.reset_retry_count()
    cache._STATS.hits = cache._STATS.misses = cache._STATS.evicted = 0
