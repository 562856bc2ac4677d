"""One budget of recoveries per run, whatever moment of the worker group's start a worker is lost at
(pipeline/train/recovery.py): the policy with Ray's own error and state objects, then a real run on
a real local Ray cluster whose rank 1 is SIGKILLed at three moments of three starts."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import ray.cloudpickle
from mlflow.tracking import MlflowClient
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2._internal.execution.controller.state import ReschedulingState, RestartingState, RunningState
from ray.train.v2.api.exceptions import ControllerError, PreemptionError

from pipeline.config import load_config
from pipeline.train.recovery import (START_LOSS, FailureBudgetSpent, RecoveryTally, failures_left,
                                     fit_with_recovery)
from pipeline.train.trainer import TrainingError, train

REPO = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the kill callback runs in Ray's controller


def _start_loss() -> ControllerError:
    return ControllerError(ActorDiedError())


def _nothing(sigint_handler) -> None:
    """What a relaunch frees here: no Ray cluster, nothing held (the real runs below free theirs)."""


class _Fits:
    """A fit that raises the given errors in turn, then returns "trained"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls: list[bool] = []

    def __call__(self, tally: RecoveryTally, relaunched: bool):
        self.calls.append(relaunched)
        if self.errors:
            raise self.errors.pop(0)
        return "trained", tally.reasons()


def test_a_worker_lost_while_starting_is_relaunched_and_counted() -> None:
    fits, told = _Fits(_start_loss(), _start_loss()), []
    result, reasons = fit_with_recovery(fits, max_failures=2, on_relaunch=told.append, reclaim=_nothing)
    assert result == "trained" and fits.calls == [False, True, True] and told == [1, 2]
    assert len(reasons) == 2 and all(reason.startswith(START_LOSS) for reason in reasons)


def test_the_relaunches_stop_at_the_budget_with_rays_own_error() -> None:
    last = _start_loss()
    fits, told = _Fits(_start_loss(), last), []
    with pytest.raises(ControllerError) as caught:
        fit_with_recovery(fits, max_failures=1, on_relaunch=told.append, reclaim=_nothing)
    assert caught.value is last and told == [1] and fits.calls == [False, True]
    unlimited = _Fits(*[_start_loss() for _ in range(5)])
    assert fit_with_recovery(unlimited, max_failures=-1, reclaim=_nothing)[0] == "trained" and len(unlimited.calls) == 6


@pytest.mark.parametrize("error", [ControllerError(ValueError("a bug in a callback")), RuntimeError("not Ray's")])
def test_other_failures_are_not_relaunched(error: BaseException) -> None:
    fits, told = _Fits(error), []
    with pytest.raises(type(error)):
        fit_with_recovery(fits, max_failures=3, on_relaunch=told.append, reclaim=_nothing)
    assert fits.calls == [False] and told == []


def test_the_tally_counts_rays_restarts_and_reschedules_and_stops_past_the_budget(tmp_path) -> None:
    tally = RecoveryTally(tmp_path / "recoveries", max_failures=2)
    assert failures_left(tally) == 2
    tally.after_controller_state_update(RunningState(), RunningState())
    preempted = PreemptionError(SimpleNamespace(preempted_ranks=[1]))
    tally.after_controller_state_update(RunningState(), RestartingState(preempted))
    assert tally.count() == 0  # running is no recovery; a preemption has its own budget in Ray
    tally.after_controller_state_update(RunningState(), ReschedulingState(
        ControllerError(WorkerGroupStartupFailedError("At least one of the worker actors failed to initialize."))))
    assert tally.count() == 1 and failures_left(tally) == 1 and "failed to initialize" in tally.reasons()[0]
    tally.add(START_LOSS)
    assert failures_left(tally) == 0
    with pytest.raises(FailureBudgetSpent, match=r"train.max_failures=2 spent: recovery 3 needed"):
        tally.after_controller_state_update(RunningState(), RestartingState(ControllerError(ActorDiedError())))
    assert failures_left(RecoveryTally(tmp_path / "other", max_failures=-1)) == -1


# --- a real run ------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class KillRank1(WorkerGroupCallback):
    """SIGKILLs rank 1 at one moment of each of the first worker-group starts, in the order of
    ``moments``: "context" (before the workers' train context exists), "launch" (the group is up,
    the training function not yet launched), "running" (just launched). A file counts the starts,
    so the count survives the controller a relaunch replaces."""

    def __init__(self, moments: list[str], record: str) -> None:
        self.moments, self.record = moments, record

    def _kill(self, moment: str, workers: list) -> None:
        starts = Path(self.record).read_text().splitlines() if os.path.exists(self.record) else []
        if len(starts) >= len(self.moments) or self.moments[len(starts)] != moment:
            return
        pid = next(w.metadata.pid for w in workers if w.distributed_context.world_rank == 1)
        with open(self.record, "a") as out:
            out.write(f"{moment} {pid}\n")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < deadline, f"rank 1 (pid {pid}) still alive after SIGKILL"
            time.sleep(0.05)

    def before_init_train_context(self, workers: list) -> dict:
        self._kill("context", workers)
        return {}

    def after_worker_group_start(self, worker_group) -> None:
        self._kill("launch", worker_group.get_workers())

    def after_worker_group_training_start(self, worker_group) -> None:
        self._kill("running", worker_group.get_workers())


def _config(dataset: str, uri: str, tmp_path: Path, *extra: str):
    return load_config(REPO / "configs" / "digits-categorical.yaml",
                       [f"data.url={dataset}", f"tracking.uri={uri}", f"train.storage={tmp_path / 'ray'}",
                        "train.epochs=1", "model.hidden=[32]", "tracking.experiment=recovery", *extra])


@pytest.mark.timeout(600)
def test_a_worker_lost_at_any_moment_of_the_start_is_one_recovery(ray_cluster, digits_dataset, tracking_uri,
                                                                   tmp_path) -> None:
    record = tmp_path / "kills"
    moments = ["context", "launch", "running"]
    result = train(_config(digits_dataset, tracking_uri, tmp_path, "train.max_failures=3"),
                   callbacks=[KillRank1(moments, str(record))])

    kills = record.read_text().split()
    assert kills[::2] == moments and len(set(kills[1::2])) == 3  # three starts, a different rank 1 each
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.epochs == 1
    assert len(result.recoveries) == 3, result.recoveries
    context, launch, running = result.recoveries
    assert "failed to initialize" in context  # Ray's own start-up retry
    assert launch.startswith(START_LOSS)  # the window Ray ends the run in: relaunched by the driver
    assert running.startswith("WorkerGroupError")  # Ray's restart of a running group
    assert run.data.tags["restarts"] == "1" and run.data.tags["last_restart"] == START_LOSS


@pytest.mark.slow  # ~25 s; the budget itself is checked above without Ray, the recovery path by the run above
@pytest.mark.timeout(600)
def test_a_start_loss_past_the_budget_fails_the_run_naming_the_budget(ray_cluster, digits_dataset, tracking_uri,
                                                                       tmp_path) -> None:
    config = _config(digits_dataset, tracking_uri, tmp_path, "train.max_failures=1")
    with pytest.raises(TrainingError, match="marked FAILED"):
        train(config, callbacks=[KillRank1(["running", "launch"], str(tmp_path / "kills"))])
    (run,) = MlflowClient(tracking_uri).search_runs([MlflowClient(tracking_uri).get_experiment_by_name(
        "recovery").experiment_id])
    assert run.info.status == "FAILED"
