"""One budget of recoveries per run (`train.max_failures`), whatever moment a worker is lost at.

Ray Train recovers most losses itself: a worker that dies while training restarts the worker group
from the latest checkpoint (counted against FailureConfig.max_failures), and one that dies while the
group initialises is retried as a start-up failure (counted against a separate controller limit).
One window is not covered: a worker lost after the group has initialised but before the training
function is launched on it (Ray 2.60, worker_group.py: the launch's ``ray.get`` sits outside the
start-up error handling). The controller then ends the whole run on "The actor died unexpectedly",
with retries left. On a cluster that is a node lost, or an OOM, during start-up.

So the driver here:
- counts every recovery of the run in one tally, read by the driver and written by a controller
  callback (`RecoveryTally`; the controller runs on the driver's node, so a local file is enough),
  and stops the run when the tally would pass ``max_failures``;
- relaunches the fit itself after a loss in that window (Ray resumes the run from its latest
  checkpoint: same name, same storage), as one more recovery in the same tally.

Preemptions are Ray's own budget (FailureConfig.max_preemption_failures) and are not counted.
"""

from __future__ import annotations

import gc
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback

START_LOSS = "a worker was lost while the worker group started"


class FailureBudgetSpent(RuntimeError):
    """More recoveries than train.max_failures allows (raised in the controller: Ray ends the run)."""


class RecoveryTally(ControllerCallback):
    """One line per recovery in a file on the driver's node: Ray's restarts and reschedules (entered
    by the controller, seen here) and the driver's own relaunches (`add`)."""

    def __init__(self, path: str | Path, max_failures: int) -> None:
        self.path = str(path)
        self.max_failures = max_failures

    def count(self) -> int:
        return len(self.reasons())

    def reasons(self) -> list[str]:
        return Path(self.path).read_text().splitlines() if os.path.exists(self.path) else []

    def add(self, reason: str) -> int:
        """Record one recovery; returns the tally. Raises FailureBudgetSpent past the budget."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # (a Ray client's controller is on another node)
        with open(self.path, "a") as out:
            out.write(" ".join(reason.split())[:300] + "\n")
        tally = self.count()
        if 0 <= self.max_failures < tally:
            raise FailureBudgetSpent(f"train.max_failures={self.max_failures} spent: recovery {tally} needed after: "
                                     f"{self.reasons()[-1]}")
        return tally

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        from ray.train.v2._internal.execution.controller.state import ReschedulingState, RestartingState
        from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure

        if isinstance(current_state, (RestartingState, ReschedulingState)):
            error = current_state.training_failed_error
            if not _is_preemption_failure(error):  # Ray's own test for what its preemption budget pays
                self.add(f"{type(error).__name__}: {error}")


def lost_while_starting(error: BaseException) -> bool:
    """Whether ``error`` (what TorchTrainer.fit raised) is a worker actor lost in the window Ray does
    not retry: a controller error whose cause is the actor's death."""
    from ray.exceptions import RayActorError
    from ray.train.v2.api.exceptions import ControllerError

    return isinstance(error, ControllerError) and isinstance(error.controller_failure, RayActorError)


def fit_with_recovery(fit: Callable[[RecoveryTally, bool], Any], max_failures: int,
                      on_relaunch: Callable[[int], None] = lambda tally: None,
                      reclaim: Callable[[Any], None] | None = None) -> Any:
    """``fit(tally, relaunched)`` until it returns, relaunching after a worker lost while the group
    started, within ``max_failures`` recoveries in all (-1: unlimited). ``fit`` builds a trainer
    whose run config carries ``tally`` as a callback and a FailureConfig with what is left
    (`failures_left`); ``on_relaunch(tally)`` is told of each relaunch, and ``reclaim`` (by default
    `reclaim_failed_attempt`) frees what the failed attempt holds before the next."""
    reclaim = reclaim or reclaim_failed_attempt
    with tempfile.TemporaryDirectory(prefix="pipeline-recoveries-") as tmp:
        tally = RecoveryTally(Path(tmp) / "recoveries", max_failures)
        relaunched = False
        sigint = signal.getsignal(signal.SIGINT)
        while True:
            if relaunched:
                reclaim(sigint)
            try:
                return fit(tally, relaunched)
            except Exception as err:
                if not lost_while_starting(err):
                    raise
                try:
                    count = tally.add(f"{START_LOSS}: {err.controller_failure}")
                except FailureBudgetSpent:
                    raise err from None
            on_relaunch(count)
            relaunched = True


def reclaim_failed_attempt(sigint_handler: Any, wait_s: float = 15.0) -> None:
    """Free what the failed attempt still holds, so the relaunched group can be placed.

    Its controller actor lives while anything here holds its handle: the SIGINT handler Ray's fit
    installed, and the frames of the error's traceback. Dropping both lets Ray end the controller and
    the workers it created. Its placement group outlives it (Ray removes a group when both its creator
    and its job are gone, and our job lives on; Ray Train's cleaner actor needs the dashboard), so the
    groups of this job whose creator is dead are removed here."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, sigint_handler)
    gc.collect()
    deadline = time.monotonic() + wait_s
    while not release_orphaned_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.25)


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many.
    (Ray's public table leaves out the creator, so this reads the GCS records themselves.)"""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not ray.is_initialized():
        return 0
    job = ray.get_runtime_context().get_job_id()
    released = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (group.state == gcs_pb2.PlacementGroupTableData.REMOVED or group.is_detached
                or not group.creator_actor_dead or group.creator_job_id.hex() != job):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
        released += 1
    return released


def failures_left(tally: RecoveryTally) -> int:
    """What Ray's FailureConfig may still use (-1: unlimited); the tally enforces the total."""
    return -1 if tally.max_failures < 0 else max(0, tally.max_failures - tally.count())
