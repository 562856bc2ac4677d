"""The retraining scheduler's decisions: a fake clock, real state files, real dataset manifests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import Split, write_shards
from pipeline.ops.schedule import Scheduler, TriggerEvent, load_state

T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=timezone.utc)
EVERY_5_S = "* * * * * */5"  # croniter: a 6th field is seconds


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> "Clock":
        self.now = T0 + timedelta(seconds=seconds)
        return self


class Recorder:
    """The trigger: records events and returns a job id, as a submission would."""

    def __init__(self) -> None:
        self.events: list[TriggerEvent] = []

    def __call__(self, event: TriggerEvent) -> str:
        self.events.append(event)
        return event.submission_id


def scheduler(state: Path, clock: Clock, trigger: Recorder, **kwargs) -> Scheduler:
    return Scheduler(trigger=trigger, state_path=state, prefix="digits", clock=clock, log=lambda _: None, **kwargs)


def test_cron_fires_exactly_once_per_tick(tmp_path):
    clock, jobs = Clock(T0), Recorder()
    s = scheduler(tmp_path / "state.json", clock, jobs, cron=EVERY_5_S)
    for second in [1, 2, 4.9, 5, 5.1, 6, 9.99, 10, 10, 12, 14]:  # ticks due at :05 and :10
        clock.at(second)
        s.poll()
    assert [e.tick.second for e in jobs.events] == [5, 10]
    assert [e.kind for e in jobs.events] == ["cron", "cron"]
    assert len({e.submission_id for e in jobs.events}) == 2


def test_restart_neither_repeats_nor_misses_a_tick(tmp_path):
    state, jobs = tmp_path / "state.json", Recorder()
    first = scheduler(state, Clock(T0), jobs, cron=EVERY_5_S)
    first.poll()
    first.clock.at(5.5)
    first.poll()  # tick :05 handled
    # restart at 6 s: tick :05 must not fire again
    second = scheduler(state, Clock(T0).at(6), jobs, cron=EVERY_5_S)
    assert second.poll() == []
    # down from 6 s to 23 s: ticks :10, :15, :20 were missed -> one job, for the latest
    third = scheduler(state, Clock(T0).at(23), jobs, cron=EVERY_5_S)
    assert [e.tick.second for e in third.poll()] == [20]
    assert third.poll() == []
    assert [e.tick.second for e in jobs.events] == [5, 20]
    assert len(load_state(state).history) == 2


def test_submission_ids_are_derived_from_the_tick(tmp_path):
    """Idempotency key: a crash after submitting but before saving re-derives the same id (Ray refuses it)."""
    ids = []
    for run in range(2):
        jobs = Recorder()
        s = scheduler(tmp_path / f"state{run}.json", Clock(T0), jobs, cron=EVERY_5_S)
        s.poll()
        s.clock.at(7)
        s.poll()
        ids.append(jobs.events[0].submission_id)
    assert ids[0] == ids[1] == "digits-cron-20261124t120005"


def _dataset(root: Path, train_samples: int) -> str:
    rng = np.random.default_rng(0)  # same seed: the first shards are identical in both versions

    def split(n):
        return Split(images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, n))

    write_shards({"val": split(20), "train": split(train_samples)}, str(root), source="random",
                 samples_per_shard=50, progress=False)
    return str(root)


def test_new_manifest_version_triggers_exactly_one_job(tmp_path):
    data, state, jobs = tmp_path / "data", tmp_path / "state.json", Recorder()
    url = _dataset(data, 100)  # 2 train shards
    clock = Clock(T0)
    s = scheduler(state, clock, jobs, data_url=url)
    assert s.poll() == []  # the data present at start is the baseline
    assert s.poll() == []
    _dataset(data, 150)  # a third shard lands: a new manifest version
    events = s.poll()
    assert [e.kind for e in events] == ["new-data"]
    assert events[0].digest != events[0].previous_digest and events[0].previous_digest is not None
    assert s.poll() == [] and s.poll() == []
    restarted = scheduler(state, clock.at(60), jobs, data_url=url)
    assert restarted.poll() == []  # restart: same version, no job
    assert len(jobs.events) == 1


def test_data_going_back_and_forth_gets_a_new_job_each_time(tmp_path):
    """A -> B -> A -> B: four versions handled, three jobs, three ids (Ray refuses an id it has seen)."""
    data, state, jobs = tmp_path / "data", tmp_path / "state.json", Recorder()
    url = _dataset(data, 100)
    s = scheduler(state, Clock(T0), jobs, data_url=url)
    s.poll()  # A: the baseline
    for train_samples in (150, 100, 150):  # B, A, B
        _dataset(data, train_samples)
        assert [e.kind for e in s.poll()] == ["new-data"]
    a, b = jobs.events[0].previous_digest, jobs.events[0].digest
    assert [(e.previous_digest, e.digest) for e in jobs.events] == [(a, b), (b, a), (a, b)]
    assert len({e.submission_id for e in jobs.events}) == 3
    # a crash after submitting the last job but before saving: the restarted scheduler derives the same id
    saved = load_state(state)
    saved.history.pop()
    saved.last_digest = a
    state.write_text(saved.model_dump_json())
    again = Recorder()
    assert [e.submission_id for e in scheduler(state, Clock(T0), again, data_url=url).poll()] == [jobs.events[-1].submission_id]


def test_new_data_and_cron_together_make_one_job(tmp_path):
    data, jobs = tmp_path / "data", Recorder()
    url = _dataset(data, 100)
    s = scheduler(tmp_path / "state.json", Clock(T0), jobs, cron=EVERY_5_S, data_url=url)
    s.poll()
    _dataset(data, 150)
    s.clock.at(6)
    assert [e.kind for e in s.poll()] == ["new-data"]  # the tick is consumed by the same job
    s.clock.at(7)
    assert s.poll() == []


def test_unreadable_manifest_is_retried_not_fatal(tmp_path):
    messages, jobs = [], Recorder()
    s = Scheduler(trigger=jobs, state_path=tmp_path / "s.json", prefix="x", data_url=str(tmp_path / "missing"),
                  clock=Clock(T0), log=messages.append)
    assert s.poll() == [] and "manifest" in messages[0]


def test_bad_cron_and_nothing_to_do_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cron"):
        scheduler(tmp_path / "s.json", Clock(T0), Recorder(), cron="every day")
    with pytest.raises(ValueError, match="nothing to schedule"):
        scheduler(tmp_path / "s.json", Clock(T0), Recorder())


def test_run_stops_after_max_triggers(tmp_path):
    clock, jobs = Clock(T0), Recorder()
    s = scheduler(tmp_path / "state.json", clock, jobs, cron=EVERY_5_S)
    sleeps = []

    def sleep(seconds):  # the fake clock advances as the scheduler sleeps
        sleeps.append(seconds)
        clock.now += timedelta(seconds=seconds)

    assert s.run(poll_seconds=1.0, max_triggers=3, sleep=sleep) == 3
    assert [e.tick.second for e in jobs.events] == [5, 10, 15]
