"""`pipeline sweep`'s driver: connect to Ray, find (by the sweep's key) or create the parent run, run
the trials that still need it as one Ray Tune grid, collect every trial's outcome as MLflow records it,
and log the aggregates into the parent.

A trial that fails for good — after Ray Train's worker restarts (``train.max_failures``) and Tune's
restarts of the trial driver (``TRIAL_RESTARTS``) — is tagged ``sweep.outcome=failed`` with the reason
in ``sweep.failure``, left out of the aggregates and counted; a resumed sweep does not run it again
unless ``retry_failed``.

Concurrency: each trial holds no CPU itself (its training workers ask for theirs); at most
``max_concurrent`` trials run at once, by default as many as the cluster's CPUs (and GPUs) fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from rich.console import Console

from pipeline.ops.sweep.results import (SweepResult, TrialOutcome, aggregates_by_point, aggregates_table,
                                        parent_metrics)
from pipeline.ops.sweep.spec import SweepSpec, Trial
from pipeline.ops.sweep.trial import completed, find_child, tune_trial
from pipeline.train.hardware import gpus_wanted

console = Console(stderr=True, soft_wrap=True)  # messages name paths and URLs: never break them

TRIAL_RESTARTS = 2  # Tune restarts of a trial whose driver died (its training resumes from a checkpoint)


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why."""


def trial_resources(spec: SweepSpec, cluster_gpus: float) -> dict[str, float]:
    """What one trial's workers hold (the largest over the grid); train.use_gpu=auto as each trial's
    own run will resolve it on this cluster (train/hardware.py)."""
    cpus = max(t.config.train.workers * t.config.train.cpus_per_worker for t in spec.trials)
    gpus = max(t.config.train.workers if gpus_wanted(t.config.train, cluster_gpus) else 0
               for t in spec.trials)
    return {"CPU": cpus, "GPU": gpus}


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def trials_that_fit(spec: SweepSpec) -> int:
    """How many trials the cluster's CPUs (and GPUs) hold at once, at least 1."""
    import ray

    cluster = ray.cluster_resources()
    need = trial_resources(spec, cluster.get("GPU", 0))
    fits = [int(cluster.get(name, 0) // amount) for name, amount in need.items() if amount > 0]
    return max(1, min(fits)) if fits else 1


def _parent(spec: SweepSpec, uri: str, *, fresh: bool, evaluate_k: int | None, manifest_digest: str) -> tuple[str, int]:
    """The parent run (found by the sweep's key, else created) and this invocation's attempt number."""
    from pipeline.ops.naming import default_run_name
    from pipeline.runs import store

    experiment = spec.base.tracking.experiment
    found = [] if fresh else store.runs_tagged(uri, experiment, {"sweep.key": spec.key, "sweep.role": "parent"})
    if found:
        run = found[0]
        attempt = int(run.data.tags.get("sweep.attempts", "0")) + 1
        store.reopen_run(uri, run.info.run_id)
        store.set_run_tags(uri, run.info.run_id, {"sweep.attempts": attempt,
                                                  "sweep.evaluate_k": evaluate_k or "none"})
        return run.info.run_id, attempt
    grid_keys = {key for key, _ in spec.grid}
    common = {k: v for k, v in spec.base.flat().items()
              if k not in grid_keys and k not in ("train.seed", "tracking.run_name")}
    params = {**common, "sweep.config": spec.config_path, "sweep.overrides": spec.overrides,
              "sweep.seeds": spec.seeds, **{f"sweep.grid.{key}": values for key, values in spec.grid}}
    version = store.code_version()
    tags = {"sweep.role": "parent", "sweep.key": spec.key, "sweep.attempts": 1, "sweep.evaluate_k": evaluate_k or "none",
            "sweep.trials": len(spec.trials), "sweep.points": len({t.point for t in spec.trials}),
            "dataset.url": spec.base.data.url, "dataset.manifest_sha256": manifest_digest, "code_version": version,
            "trigger": "sweep", "latent": spec.base.model.latent.kind,
            "mlflow.note.content": _note(spec)}
    name = spec.base.tracking.run_name or f"sweep-{default_run_name(spec.base)}"
    run_id = store.start_parent_run(uri, experiment, run_name=name, tags=tags, params=params, files={
        "sweep/definition.json": json.dumps(spec.definition(), indent=2), "config.yaml": store.config_yaml(spec.base)})
    return run_id, 1


def _note(spec: SweepSpec) -> str:
    grid = " ".join(f"--grid {k}={','.join(v)}" for k, v in spec.grid)
    overrides = " ".join(f"-o {o}" for o in spec.overrides)
    return (f"pipeline sweep {spec.config_path} {overrides} --seeds {','.join(map(str, spec.seeds))} {grid}".strip()
            + f"\n\n{len(spec.trials)} trials; per grid point the mean, sd and n of each final figure are the metrics "
            "sweep/<point>/<figure>/{mean,sd,n}; the table is sweep/aggregates.csv.")


def run_sweep(spec: SweepSpec, *, address: str | None = None, max_concurrent: int | None = None,
              evaluate_k: int | None = None, fresh: bool = False, retry_failed: bool = False) -> SweepResult:
    """Run (or continue) the sweep; returns every trial's outcome and the aggregates logged to the parent.
    What Ray and Tune print on the way (trial tables, worker logs) goes to stderr: stdout stays the
    caller's (`pipeline sweep --json`)."""
    with contextlib.redirect_stdout(sys.stderr):
        return _run_sweep(spec, address=address, max_concurrent=max_concurrent, evaluate_k=evaluate_k, fresh=fresh,
                          retry_failed=retry_failed)


def _run_sweep(spec: SweepSpec, *, address: str | None, max_concurrent: int | None, evaluate_k: int | None,
               fresh: bool, retry_failed: bool) -> SweepResult:
    import ray

    from pipeline.data import DataError, read_manifest
    from pipeline.runs import store
    from pipeline.train.trainer import (TrainingError, _tune_ray_train_env, connect_ray,
                                        shutdown_local_ray_quietly)

    started = time.perf_counter()
    uri = spec.base.tracking.uri
    experiment = spec.base.tracking.experiment
    try:
        manifest = read_manifest(spec.base.data.url)  # fail on a bad path before any trial starts
    except DataError as err:
        raise SweepError(str(err)) from None
    _tune_ray_train_env()  # before Ray starts: the trials' Ray Train runs inherit it
    was_connected = ray.is_initialized()
    try:
        own_cluster = connect_ray(address, max((t.config for t in spec.trials),
                                               key=lambda c: c.train.workers * c.train.cpus_per_worker))
    except TrainingError as err:
        raise SweepError(str(err)) from None
    try:
        parent_id, attempt = _parent(spec, uri, fresh=fresh, evaluate_k=evaluate_k, manifest_digest=manifest.digest())
        console.print(f"sweep parent run [bold]{parent_id}[/] in experiment '{experiment}' ({uri}), "
                      f"attempt {attempt}: {len(spec.trials)} trials")
        todo, reused = [], {}  # reused: trials an earlier attempt trained to the end or gave up on
        for trial in spec.trials:
            child = find_child(uri, experiment, parent_id, trial.key)
            given_up = child is not None and child.data.tags.get("sweep.outcome") == "failed" and not retry_failed
            if given_up or (child is not None and child.info.status == "FINISHED"):
                reused[trial.key] = child
            if not (given_up or completed(child, evaluate_k)):
                todo.append(trial)  # to train, to continue, or (trained already) to evaluate
        if reused:
            console.print(f"reusing {len(reused)} trial(s) an earlier attempt finished or gave up on; "
                          f"{len(todo)} to run" + (" or evaluate" if evaluate_k else ""))
        fits = trials_that_fit(spec)
        if max_concurrent and max_concurrent > fits:
            console.print(f"[yellow]warning:[/] --max-concurrent {max_concurrent}, but the cluster holds {fits} "
                          f"trial(s) of {trial_resources(spec, _cluster_gpus())} at once: the others wait "
                          "for their workers")
        try:
            errors = _run_tune(spec, todo, parent_id=parent_id, attempt=attempt, limit=max_concurrent or fits,
                               evaluate_k=evaluate_k, retry_failed=retry_failed) if todo else {}
        except BaseException as err:  # the sweep itself broke or was interrupted: the same command continues it
            why = _root(err) if isinstance(err, Exception) else type(err).__name__
            store.end_run(uri, parent_id, failed=True, reason=f"attempt {attempt} stopped: {why}")
            raise
        outcomes = _outcomes(spec, uri, parent_id, reused, errors, evaluate_k)
        aggregates = aggregates_by_point(outcomes)
        failed = {point: sum(o.outcome == "failed" for o in outcomes if o.trial.point == point)
                  for point in aggregates}
        result = SweepResult(parent_id, uri, experiment, attempt, outcomes, aggregates, failed,
                             time.perf_counter() - started)
        store.log_summary(uri, parent_id, parent_metrics(aggregates, outcomes), step=attempt, tags={
            "sweep.trials.finished": result.finished, "sweep.trials.failed": result.failed,
            "sweep.failed_trials": ", ".join(o.trial.name for o in outcomes if o.outcome == "failed")[:5000] or "none"})
        store.log_text_files(uri, parent_id, {
            "sweep/aggregates.csv": aggregates_table(aggregates, failed),
            "sweep/result.json": json.dumps(result.as_dict(), indent=2)})
        store.end_run(uri, parent_id, failed=result.finished == 0)
    finally:
        if own_cluster:
            shutdown_local_ray_quietly()
        elif not was_connected and ray.is_initialized():
            ray.shutdown()  # we joined a cluster at --address: leave it
    return result


def _run_tune(spec: SweepSpec, todo: list[Trial], *, parent_id: str, attempt: int, limit: int,
              evaluate_k: int | None, retry_failed: bool) -> dict[str, str]:
    """The trials as one Tune grid; returns {trial key: error} for trials Tune gave up on."""
    from ray import tune

    from pipeline.data.remote import ray_storage_kwargs

    specs = [{"config": t.config.model_dump(mode="json") | {"tracking": t.config.tracking.model_dump(mode="json")
                                                            | {"run_name": t.name}},
              "tracking_uri": spec.base.tracking.uri, "parent": parent_id, "key": t.key, "point": t.point,
              "seed": t.seed, "sweep_key": spec.key, "evaluate_k": evaluate_k, "retry_failed": retry_failed}
             for t in todo]
    limit = min(limit, len(todo))
    console.print(f"running {len(todo)} trial(s), at most {limit} at a time")
    # verbose=0 silences Tune's reporter only in its classic output; the newer one still prints a
    # configuration box and a TensorBoard hint. The summary table below says what the sweep did.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        # The trial only drives its training run, whose workers ask for the CPUs themselves. Tune refuses a
        # trial without resources: one byte of memory is what it holds.
        tune.with_resources(tune_trial, {"CPU": 0, "memory": 1}),
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=limit, reuse_actors=True,
                                    trial_name_creator=_trial_dir_name, trial_dirname_creator=_trial_dir_name),
        run_config=tune.RunConfig(name=f"sweep-{parent_id[:8]}-attempt{attempt}", verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RESTARTS),
                                  **ray_storage_kwargs(spec.base.train.storage)),
    )
    grid = tuner.fit()
    _stop_echoing_worker_logs()
    errors = {}
    for result in grid:
        key = result.config["trial"]["key"]
        if result.error is not None:
            errors[key] = _root(result.error)
        elif (result.metrics or {}).get("outcome") == "failed":
            errors[key] = (result.metrics or {}).get("reason") or "failed"
    return errors


def _stop_echoing_worker_logs() -> None:
    """Every trial has ended and said how: what Ray's processes print from here on is the teardown of
    the trial actors Tune ends (a SIGTERM traceback per cached actor), which reads as a failure on the
    console. The handler is Ray's own (ray/_private/worker.py), as in `pipeline train`'s shutdown."""
    from ray._private import worker as ray_worker

    with contextlib.suppress(Exception):
        ray_worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")


def _trial_dir_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _root(err: BaseException) -> str:
    from pipeline.train.trainer import _root_cause

    return _root_cause(err)


def _outcomes(spec: SweepSpec, uri: str, parent_id: str, reused: dict[str, Any], errors: dict[str, str],
              evaluate_k: int | None) -> list[TrialOutcome]:
    """Every trial's outcome as MLflow now records it; a child Tune gave up on is marked failed."""
    from pipeline.runs import store

    experiment = spec.base.tracking.experiment
    outcomes = []
    for trial in spec.trials:
        child = find_child(uri, experiment, parent_id, trial.key)
        tags = child.data.tags if child is not None else {}
        if completed(child, evaluate_k):
            if tags.get("sweep.outcome") != "finished":
                store.set_run_tags(uri, child.info.run_id, {"sweep.outcome": "finished"})
            outcomes.append(TrialOutcome(trial, "finished", child.info.run_id, trial.key in reused,
                                         metrics=dict(child.data.metrics)))
            continue
        reason = tags.get("sweep.failure") or errors.get(trial.key) or tags.get("failure") or "did not finish"
        if child is not None and tags.get("sweep.outcome") != "failed":
            store.set_run_tags(uri, child.info.run_id, {"sweep.outcome": "failed", "sweep.failure": reason[:5000]})
            if child.info.status not in ("FINISHED", "FAILED"):
                store.end_run(uri, child.info.run_id, failed=True)
        outcomes.append(TrialOutcome(trial, "failed", child.info.run_id if child else None, trial.key in reused,
                                     reason=reason))
    return outcomes
