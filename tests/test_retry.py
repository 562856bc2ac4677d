"""The one retry policy (pipeline/data/retry.py): which errors are retried, how often, how long it waits, who hears."""

from __future__ import annotations

import pytest

from pipeline.data.retry import RetryPolicy


def _failing(times: int, error: Exception):
    calls = []

    def func() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return func, calls


def test_retries_then_reraises_the_last_error_unchanged() -> None:
    policy = RetryPolicy(retries=2, backoff_s=0.0, jitter=False)
    func, calls = _failing(2, ConnectionResetError("reset"))
    assert policy.retrying()(func) == "done" and len(calls) == 3  # the first attempt and 2 retries
    func, calls = _failing(5, ConnectionResetError("reset"))
    with pytest.raises(ConnectionResetError, match="reset"):
        policy.retrying()(func)
    assert len(calls) == 3


def test_only_the_errors_when_picks_are_retried_and_each_retry_is_heard() -> None:
    policy = RetryPolicy(retries=5, backoff_s=0.0, jitter=False)
    heard: list[BaseException] = []
    func, calls = _failing(1, ValueError("final"))
    with pytest.raises(ValueError):
        policy.retrying(when=lambda err: isinstance(err, OSError), on_retry=heard.append)(func)
    assert len(calls) == 1 and heard == []
    func, calls = _failing(3, OSError("again"))
    assert policy.retrying(when=lambda err: isinstance(err, OSError), on_retry=heard.append)(func) == "done"
    assert [str(err) for err in heard] == ["again"] * 3


def test_give_up_ends_an_unlimited_policy() -> None:
    asked: list[int] = []

    def give_up() -> bool:
        asked.append(1)
        return len(asked) >= 4

    func, calls = _failing(100, RuntimeError("down"))
    with pytest.raises(RuntimeError):
        RetryPolicy(retries=None, backoff_s=0.0, jitter=False).retrying(give_up=give_up)(func)
    assert len(calls) == 4


def test_backoff_doubles_to_its_cap_with_jitter_on_the_upper_half() -> None:
    fixed = RetryPolicy(backoff_s=0.5, max_backoff_s=4.0, jitter=False)
    assert [fixed.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert fixed.delay(10_000) == 4.0  # no overflow in an endless loop
    jittered = RetryPolicy(backoff_s=0.2, max_backoff_s=5.0)
    assert all(0.1 <= jittered.delay(0) <= 0.2 for _ in range(100))
    assert all(2.5 <= jittered.delay(9) <= 5.0 for _ in range(100))
