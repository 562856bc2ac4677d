"""Every retry in the project: one policy type, one loop (tenacity underneath).

A `RetryPolicy` says how hard to try: at most ``retries`` retries (or none: until a deadline or a
``give_up`` test ends them), waiting ``backoff_s`` before the first and doubling up to
``max_backoff_s``, jittered or not. `RetryPolicy.retrying` is the loop: ``when`` picks the errors
worth another attempt, ``on_retry`` hears each failed attempt before its backoff, and the last
error is re-raised unchanged.

Its users: shard and manifest reads on object storage (`data/remote.py`: transient errors only,
each retry counted in the reader's stats), the cache's eviction race (`data/reader.py`), rank 0's
MLflow writes (`runs/logger.py`) and `pipeline submit` waiting for a Ray head's job agent
(`ops/submit.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, stop_any, stop_never

_MAX_DOUBLINGS = 64  # the backoff is capped long before: keeps 2**n from overflowing in an endless loop


def _any_exception(err: BaseException) -> bool:
    return isinstance(err, Exception)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``retries`` retries per operation (None: no limit), backoff doubling from
    ``backoff_s`` up to ``max_backoff_s``, with full jitter on its upper half unless ``jitter`` is
    False; ``deadline_s`` ends the retries that long after the first attempt."""

    retries: int | None = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    jitter: bool = True
    deadline_s: float | None = None

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt + 1``."""
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** min(attempt, _MAX_DOUBLINGS))
        # Jitter: concurrent callers that failed together do not retry together.
        return wait * random.uniform(0.5, 1.0) if self.jitter else wait

    def retrying(self, *, when: Callable[[BaseException], bool] = _any_exception,
                 on_retry: Callable[[BaseException], None] | None = None,
                 give_up: Callable[[], bool] | None = None) -> Retrying:
        """The retry loop under this policy, called as ``policy.retrying(...)(func, *args, **kwargs)``.

        ``when``: errors worth another attempt (default: any Exception); any other is raised at once.
        ``on_retry``: told each error that will be retried, before the backoff.
        ``give_up``: asked after each failed attempt; True ends the retries (the error is raised).
        """
        stops: list = [stop_never if self.retries is None else stop_after_attempt(self.retries + 1)]
        if self.deadline_s is not None:
            stops.append(stop_after_delay(self.deadline_s))
        if give_up is not None:
            stops.append(lambda _state: give_up())

        def before_sleep(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
            if on_retry is not None:
                on_retry(state.outcome.exception())

        return Retrying(stop=stop_any(*stops), retry=retry_if_exception(when), before_sleep=before_sleep,
                        wait=lambda state: self.delay(state.attempt_number - 1), reraise=True)
