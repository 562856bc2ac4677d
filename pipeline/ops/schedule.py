"""`pipeline schedule`: retrain on a cron (UTC) and/or when the dataset's manifest changes.

Exactly-once per cron tick and per data version, across restarts: the state file records the
last tick and data version handled (written atomically after each submission), and every job
gets a submission id derived from its tick/version, which Ray refuses to accept twice — so a
crash between submitting and saving cannot cause a duplicate either. Ticks missed while the
scheduler was down are coalesced into one trigger for the latest of them.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Literal

from croniter import croniter
from pydantic import BaseModel, Field

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ScheduleState(BaseModel):
    cron: str | None = None
    last_tick: datetime | None = None  # the latest cron tick already handled (or the start anchor)
    last_digest: str | None = None  # the dataset version already handled (or the baseline)
    history: list[dict] = Field(default_factory=list)  # one entry per submitted job


@dataclass(frozen=True)
class TriggerEvent:
    kind: Literal["cron", "new-data"]
    tick: datetime | None
    digest: str | None
    previous_digest: str | None
    submission_id: str  # derived from the tick / data version: the idempotency key


def load_state(path: Path) -> ScheduleState:
    return ScheduleState.model_validate_json(path.read_text()) if path.is_file() else ScheduleState()


def save_state(path: Path, state: ScheduleState) -> None:
    """Write-then-rename, so a crash never leaves a half-written state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(state.model_dump_json(indent=2))
    os.replace(tmp, path)


def manifest_digest(url: str) -> str:
    from pipeline.data import read_manifest

    return read_manifest(url).digest()


class Scheduler:
    """Decides when to retrain; `trigger(event)` does the submitting and returns a job id."""

    def __init__(self, *, trigger: Callable[[TriggerEvent], str], state_path: Path, prefix: str,
                 cron: str | None = None, data_url: str | None = None, clock: Clock = utc_now,
                 digest_of: Callable[[str], str] = manifest_digest, log: Callable[[str], None] = print) -> None:
        if cron is None and data_url is None:
            raise ValueError("nothing to schedule on: give a cron expression and/or a dataset to watch")
        if cron is not None and not croniter.is_valid(cron):
            raise ValueError(f"not a valid cron expression: {cron!r} (5 fields, or 6 with seconds last)")
        self.trigger, self.state_path, self.prefix = trigger, Path(state_path), prefix
        self.cron, self.data_url, self.clock, self.digest_of, self.log = cron, data_url, clock, digest_of, log
        self.state = load_state(self.state_path)
        if self.state.cron != cron:  # a new schedule starts counting from now, not from the old one's ticks
            self.state.cron, self.state.last_tick = cron, None

    def _due_tick(self, now: datetime) -> datetime | None:
        """The latest tick in (last_tick, now], or None. The first poll only sets the anchor."""
        if self.cron is None:
            return None
        if self.state.last_tick is None:
            self.state.last_tick = now
            return None
        latest = croniter(self.cron, now + timedelta(microseconds=1)).get_prev(datetime)
        return latest if latest > self.state.last_tick else None

    def _new_digest(self) -> str | None:
        if self.data_url is None:
            return None
        try:
            digest = self.digest_of(self.data_url)
        except Exception as err:  # noqa: BLE001 - a manifest being rewritten; look again next poll
            self.log(f"cannot read the dataset manifest at {self.data_url}: {err}")
            return None
        if self.state.last_digest is None:  # the data present at start is the baseline
            self.state.last_digest = digest
            return None
        return digest if digest != self.state.last_digest else None

    def _data_job_id(self, digest: str) -> str:
        """Numbered by the data changes handled before this one, so data that goes back and forth
        (A -> B -> A -> B) gets a new id each time; the number comes from the saved state, so a
        crash before saving re-derives the same id (and Ray refuses the duplicate)."""
        handled = sum(1 for entry in self.state.history if entry.get("trigger") == "new-data")
        old = self.state.last_digest or "none"
        return f"{self.prefix}-data-{handled + 1}-{old[:8]}-{digest[:8]}"

    def poll(self) -> list[TriggerEvent]:
        """One look at the clock and the data; submits at most one job and saves the state."""
        now = self.clock()
        tick, digest = self._due_tick(now), self._new_digest()
        events = []
        if digest is not None:  # new data wins the label when a tick falls due at the same time
            events.append(TriggerEvent("new-data", tick, digest, self.state.last_digest, self._data_job_id(digest)))
        elif tick is not None:
            events.append(TriggerEvent("cron", tick, None, None,
                                       f"{self.prefix}-cron-{tick.astimezone(timezone.utc):%Y%m%dt%H%M%S}"))
        for event in events:
            job_id = self.trigger(event)
            self.log(f"{now:%Y-%m-%d %H:%M:%S} trigger={event.kind} job={job_id}")
            self.state.history.append({"at": now.isoformat(), "trigger": event.kind, "job_id": job_id,
                                       "tick": event.tick.isoformat() if event.tick else None, "digest": event.digest})
        if tick is not None:
            self.state.last_tick = tick
        if digest is not None:
            self.state.last_digest = digest
        save_state(self.state_path, self.state)
        return events

    def run(self, *, poll_seconds: float = 30.0, max_triggers: int | None = None, once: bool = False,
            sleep: Callable[[float], None] = time.sleep) -> int:
        """Poll until stopped (or `once`, or after `max_triggers` jobs); returns the number of jobs submitted."""
        fired = 0
        while True:
            fired += len(self.poll())
            if once or (max_triggers is not None and fired >= max_triggers):
                return fired
            sleep(poll_seconds)


def job_trigger(client, request) -> Callable[[TriggerEvent], str]:
    """A trigger that submits `request` (a submit.JobRequest) as a Ray job labelled with the event."""
    from dataclasses import replace

    from pipeline.ops.submit import build_submission, submit

    def fire(event: TriggerEvent) -> str:
        submission = build_submission(replace(request, trigger=event.kind, submission_id=event.submission_id))
        try:
            return submit(client, submission)
        except RuntimeError as err:
            if "already exists" in str(err):  # submitted before a crash: Ray kept the id, no duplicate
                return event.submission_id
            raise

    return fire
