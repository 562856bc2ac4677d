"""`pipeline sweep`: a grid of settings x seeds, every trial a full training run, on Ray Tune.

Each trial is what `pipeline train` runs (`pipeline.train.trainer.train`: its own Ray Train
workers, checkpoints and fault tolerance), driven from a Ray Tune trial, and logs into its own
MLflow run: a child (tag ``mlflow.parentRunId``) of one parent run that records the sweep's
definition and, per grid point, the mean, standard deviation and n of each trial's final figures.

Identity and resumption live in MLflow, not in Tune's experiment state:

- the parent carries ``sweep.key``, a hash of the sweep's definition (resolved config, seeds,
  grid); running the same sweep again finds that parent and continues it (``fresh`` starts anew);
- each child carries ``sweep.trial_key``, a hash of its resolved config. A trial whose child is
  FINISHED (and evaluated, when asked) is reused, never run again; an unfinished child (its driver
  was killed) continues from its latest checkpoint as the same run (as `pipeline train --resume`);
- a trial that fails for good — after Ray Train's worker restarts (``train.max_failures``) and
  Tune's restarts of the trial driver (``TRIAL_RESTARTS``) — is tagged ``sweep.outcome=failed``
  with the reason in ``sweep.failure``, left out of the aggregates and counted; a resumed sweep
  does not run it again unless ``retry_failed``.

Concurrency: each trial holds no CPU itself (its training workers ask for theirs); at most
``max_concurrent`` trials run at once, by default as many as the cluster's CPUs (and GPUs) fit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.config import ConfigError, RunConfig, load_config, parse_config

console = Console(stderr=True, soft_wrap=True)  # messages name paths and URLs: never break them

TRIAL_RESTARTS = 2  # Tune restarts of a trial whose driver died (its training resumes from a checkpoint)
AGGREGATED = ("val/", "latent/", "test/")  # the final figures aggregated per grid point
NOT_AGGREGATED = re.compile(r"^val/kl_latent_\d+$")  # one KL per latent variable: too many to chart
POINT_WITHOUT_GRID = "base"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why."""


@dataclass(frozen=True)
class Trial:
    """One training run of the sweep: a grid point and a seed."""

    point: str  # "model.latent.estimator=straight-through,train.lr=0.001"; "base" without a grid
    assignments: tuple[str, ...]  # the point's overrides
    seed: int
    key: str  # sweep.trial_key: the hash of its resolved config
    config: RunConfig = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.point} seed={self.seed}"


@dataclass
class TrialOutcome:
    trial: Trial
    outcome: str  # finished | failed
    run_id: str | None
    reused: bool  # trained to the end (or given up on) by an earlier attempt: not trained again
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"point": self.trial.point, "seed": self.trial.seed, "key": self.trial.key, "run_id": self.run_id,
                "outcome": self.outcome, "reused": self.reused, "reason": self.reason}


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    experiment: str
    attempt: int
    outcomes: list[TrialOutcome]
    aggregates: dict[str, dict[str, dict[str, float]]]  # point -> metric -> {mean, sd, n}
    failed_by_point: dict[str, int]
    seconds: float

    @property
    def finished(self) -> int:
        return sum(o.outcome == "finished" for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(o.outcome == "failed" for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "attempt": self.attempt, "trials": [o.as_dict() for o in self.outcomes],
                "finished": self.finished, "failed": self.failed, "failed_by_point": self.failed_by_point,
                "aggregates": self.aggregates, "seconds": round(self.seconds, 1)}


# --- the definition ----------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" or a range "0..4" (inclusive) -> seeds, each once, in the order given."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if ".." in part:
                low, high = (int(v) for v in part.split("..", 1))
                values = list(range(low, high + 1))
            else:
                values = [int(part)]
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected integers like 0,1,2 or a range 0..4") from None
        seeds += [s for s in values if s not in seeds]
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return seeds


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: "[128],[256, 128]" -> ["[128]", "[256, 128]"]."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(entries: list[str]) -> list[tuple[str, list[str]]]:
    """["train.lr=1e-3,3e-3", "model.hidden=[128],[256,128]"] -> [(key, values), ...] (values as YAML text)."""
    grid: list[tuple[str, list[str]]] = []
    for entry in entries:
        key, sep, values = entry.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {entry!r} must look like key.path=v1,v2")
        if key == "train.seed":
            raise ConfigError("--grid train.seed: seeds are given with --seeds")
        if key.startswith("tracking."):
            raise ConfigError(f"--grid {key}: every trial of a sweep logs to the same experiment and store")
        if any(key == k for k, _ in grid):
            raise ConfigError(f"--grid {key} given twice: list all its values in one --grid")
        split = _split_top_level(values)
        if any(not v for v in split) or len(set(split)) != len(split):
            raise ConfigError(f"--grid {entry!r}: empty or repeated value")
        grid.append((key, split))
    return grid


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _identity(config: RunConfig) -> dict[str, Any]:
    """What makes a training run what it is: the config without where it is logged and checkpointed."""
    tree = config.model_dump(mode="json")
    tree.pop("tracking", None)
    tree["train"].pop("storage", None)
    return tree


def _absolute(url: str) -> str:
    return url if "://" in url else str(Path(url).expanduser().resolve())


@dataclass
class SweepSpec:
    """The sweep as the user defined it, each trial's config resolved and checked up front."""

    config_path: str
    overrides: list[str]
    seeds: list[int]
    grid: list[tuple[str, list[str]]]
    base: RunConfig
    trials: list[Trial]

    @property
    def key(self) -> str:
        return _digest({"config": _identity(self.base), "seeds": self.seeds, "grid": self.grid})

    def definition(self) -> dict[str, Any]:
        return {"config": self.config_path, "overrides": self.overrides, "seeds": self.seeds,
                "grid": {key: values for key, values in self.grid}, "key": self.key,
                "points": sorted({t.point for t in self.trials}, key=[t.point for t in self.trials].index),
                "trials": [{"point": t.point, "seed": t.seed, "key": t.key} for t in self.trials]}


def build_spec(config_path: str, overrides: list[str], seeds: list[int], grid: list[tuple[str, list[str]]], *,
               tracking_uri: str | None = None) -> SweepSpec:
    """Every trial's config (file + overrides + its grid point + train.seed), or a ConfigError naming
    the override that does not fit. Local paths become absolute: trials run in other processes."""
    def _normalized(config: RunConfig) -> RunConfig:
        from pipeline.runs.store import resolve_tracking_uri

        config.data.url = _absolute(config.data.url)
        config.train.storage = _absolute(config.train.storage or "ray_results")
        config.tracking.uri = resolve_tracking_uri(tracking_uri, config=config.tracking.uri)
        return config

    base = _normalized(load_config(config_path, overrides))
    points: list[tuple[str, ...]] = [()]
    for key, values in grid:
        points = [(*p, f"{key}={v}") for p in points for v in values]
    trials = []
    for assignments in points:
        point = ",".join(assignments) or POINT_WITHOUT_GRID
        for seed in seeds:
            try:
                config = _normalized(load_config(config_path, [*overrides, *assignments, f"train.seed={seed}"]))
            except ConfigError as err:
                raise ConfigError(f"grid point {point}, seed {seed}: {err}") from None
            trials.append(Trial(point, assignments, seed, _digest(_identity(config)), config))
    keys = [t.key for t in trials]
    if len(set(keys)) != len(keys):
        raise ConfigError("two trials of this sweep train the same config (a grid value equal to another?)")
    return SweepSpec(config_path, list(overrides), seeds, grid, base, trials)


# --- aggregates ----------------------------------------------------------------------------------


def aggregate(values: list[float]) -> dict[str, float]:
    """mean, sample standard deviation (n - 1; only for n >= 2) and n."""
    out = {"mean": statistics.mean(values), "n": float(len(values))}
    if len(values) >= 2:
        out["sd"] = statistics.stdev(values)
    return out


def final_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The figures of a finished trial that the sweep aggregates (its runs' latest values)."""
    return {k: v for k, v in metrics.items()
            if k.startswith(AGGREGATED) and not NOT_AGGREGATED.match(k) and math.isfinite(v)}


def aggregates_by_point(outcomes: list[TrialOutcome]) -> dict[str, dict[str, dict[str, float]]]:
    points: dict[str, dict[str, list[float]]] = {}
    for o in outcomes:
        points.setdefault(o.trial.point, {})
        if o.outcome != "finished":
            continue
        for name, value in final_figures(o.metrics).items():
            points[o.trial.point].setdefault(name, []).append(value)
    return {point: {name: aggregate(values) for name, values in sorted(figures.items())}
            for point, figures in points.items()}


def metric_point(assignments: tuple[str, ...] | list[str]) -> str:
    """A grid point as a segment of an MLflow metric name (letters, digits, _ - . and spaces only):
    ("model.latent.kl=relaxed", "train.lr=0.001") -> "model.latent.kl-relaxed train.lr-0.001"."""
    if not assignments:
        return POINT_WITHOUT_GRID
    return " ".join(re.sub(r"[^\w.\- ]", "_", a.replace("=", "-", 1)) for a in assignments)


def parent_metrics(aggregates: dict[str, dict[str, dict[str, float]]], outcomes: list[TrialOutcome]) -> dict[str, float]:
    """sweep/<point>/<figure>/{mean,sd,n}, sweep/<point>/trials/{finished,failed}, sweep/trials/*."""
    metrics: dict[str, float] = {}
    segments = {o.trial.point: metric_point(o.trial.assignments) for o in outcomes}
    for point, figures in aggregates.items():
        segment = segments[point]
        for name, stats in figures.items():
            for stat, value in stats.items():
                metrics[f"sweep/{segment}/{name}/{stat}"] = value
        mine = [o for o in outcomes if o.trial.point == point]
        metrics[f"sweep/{segment}/trials/finished"] = sum(o.outcome == "finished" for o in mine)
        metrics[f"sweep/{segment}/trials/failed"] = sum(o.outcome == "failed" for o in mine)
    metrics["sweep/trials/total"] = len(outcomes)
    metrics["sweep/trials/finished"] = sum(o.outcome == "finished" for o in outcomes)
    metrics["sweep/trials/failed"] = sum(o.outcome == "failed" for o in outcomes)
    return metrics


def aggregates_table(aggregates: dict[str, dict[str, dict[str, float]]], failed: dict[str, int]) -> str:
    """One row per (grid point, figure): a CSV the MLflow UI shows as a table."""
    lines = ["point,figure,mean,sd,n,failed_trials"]
    for point, figures in aggregates.items():
        for name, stats in figures.items():
            sd = stats.get("sd")
            lines.append(f"\"{point}\",{name},{stats['mean']!r},{'' if sd is None else repr(sd)},"
                         f"{int(stats['n'])},{failed.get(point, 0)}")
        if not figures:
            lines.append(f"\"{point}\",,,,0,{failed.get(point, 0)}")
    return "\n".join(lines) + "\n"


# --- trials (inside Ray Tune) -----------------------------------------------------------------------


def _find_child(tracking_uri: str, experiment: str, parent_id: str, key: str):
    """The child run of ``parent_id`` for a trial key: a FINISHED one first, else the newest."""
    from pipeline.runs import store

    runs = store.runs_tagged(tracking_uri, experiment, {"mlflow.parentRunId": parent_id, "sweep.trial_key": key})
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs or [None])[0]


def _is_evaluated(run, k: int | None) -> bool:
    return k is None or f"test/nll_is_k{k}" in run.data.metrics


def _completed(child, k: int | None) -> bool:
    """A trial that needs nothing more: trained to the end, evaluated when asked, not given up on."""
    return (child is not None and child.info.status == "FINISHED" and _is_evaluated(child, k)
            and child.data.tags.get("sweep.outcome") != "failed")


def _evaluate(run_id: str, k: int, tracking_uri: str) -> dict[str, float]:
    """`pipeline evaluate RUN_ID -k K` on the test split, as a Ray task holding the trial's CPUs."""
    from pipeline.evaluate.likelihood import evaluate_run

    return evaluate_run(run_id, split="test", importance_samples=k, tracking_uri=tracking_uri).metrics


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One Tune trial: train (or continue) the trial's child run, evaluate it once when asked, and
    say how it ended. Training failures that survived Ray Train's restarts end the trial as
    failed (not retried by Tune); anything else raises, and Tune restarts the trial, which then
    finds its child run and resumes it."""
    import ray

    from pipeline.evaluate.likelihood import EvaluationError
    from pipeline.runs import store
    from pipeline.train.trainer import TrainingError, train

    config = parse_config(spec["config"])
    uri, experiment, parent, key = spec["tracking_uri"], config.tracking.experiment, spec["parent"], spec["key"]
    child = _find_child(uri, experiment, parent, key)
    if child is None or child.info.status != "FINISHED":
        if child is not None and child.data.tags.get("sweep.outcome") == "failed" and not spec["retry_failed"]:
            return {"outcome": "failed", "run_id": child.info.run_id, "reason": child.data.tags.get("sweep.failure")}
        try:
            train(config, trigger="sweep", resume_run_id=child.info.run_id if child is not None else None,
                  resume_reason="sweep resumed the trial", tags={
                      "mlflow.parentRunId": parent, "sweep.trial_key": key, "sweep.point": spec["point"],
                      "sweep.seed": str(spec["seed"]), "sweep.key": spec["sweep_key"]})
        except TrainingError as err:
            child = _find_child(uri, experiment, parent, key)
            reason = str(err)
            if child is not None:
                store.set_run_tags(uri, child.info.run_id, {"sweep.outcome": "failed",
                                                            "sweep.failure": reason[:5000]})
            return {"outcome": "failed", "run_id": child.info.run_id if child else None, "reason": reason}
        child = _find_child(uri, experiment, parent, key)
    run_id = child.info.run_id
    k = spec["evaluate_k"]
    if not _is_evaluated(child, k):
        cpus = config.train.workers * config.train.cpus_per_worker
        try:
            # "DEFAULT": not inside the trial's own placement group (Tune's), which holds no CPU
            task = ray.remote(num_cpus=cpus)(_evaluate).options(scheduling_strategy="DEFAULT")
            ray.get(task.remote(run_id, k, uri))
        except Exception as err:  # noqa: BLE001 - EvaluationError or a task failure: the trial has no test figures
            cause = getattr(err, "cause", None) or err
            if not isinstance(cause, EvaluationError):
                raise
            reason = f"evaluation: {cause}"
            store.set_run_tags(uri, run_id, {"sweep.outcome": "failed", "sweep.failure": reason[:5000]})
            store.end_run(uri, run_id, failed=True)
            return {"outcome": "failed", "run_id": run_id, "reason": reason}
    store.set_run_tags(uri, run_id, {"sweep.outcome": "finished"})
    return {"outcome": "finished", "run_id": run_id}


# --- the driver ------------------------------------------------------------------------------------


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What one trial's workers hold (the largest over the grid)."""
    cpus = max(t.config.train.workers * t.config.train.cpus_per_worker for t in spec.trials)
    gpus = max(t.config.train.workers if t.config.train.use_gpu else 0 for t in spec.trials)
    return {"CPU": cpus, "GPU": gpus}


def trials_that_fit(spec: SweepSpec) -> int:
    """How many trials the cluster's CPUs (and GPUs) hold at once, at least 1."""
    import ray

    cluster = ray.cluster_resources()
    need = trial_resources(spec)
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
            child = _find_child(uri, experiment, parent_id, trial.key)
            given_up = child is not None and child.data.tags.get("sweep.outcome") == "failed" and not retry_failed
            if given_up or (child is not None and child.info.status == "FINISHED"):
                reused[trial.key] = child
            if not (given_up or _completed(child, evaluate_k)):
                todo.append(trial)  # to train, to continue, or (trained already) to evaluate
        if reused:
            console.print(f"reusing {len(reused)} trial(s) an earlier attempt finished or gave up on; "
                          f"{len(todo)} to run" + (" or evaluate" if evaluate_k else ""))
        fits = trials_that_fit(spec)
        if max_concurrent and max_concurrent > fits:
            console.print(f"[yellow]warning:[/] --max-concurrent {max_concurrent}, but the cluster holds {fits} "
                          f"trial(s) of {trial_resources(spec)} at once: the others wait for their workers")
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
    tuner = tune.Tuner(
        # The trial only drives its training run, whose workers ask for the CPUs themselves. Tune refuses a
        # trial without resources: one byte of memory is what it holds.
        tune.with_resources(_tune_trial, {"CPU": 0, "memory": 1}),
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


def _tune_trial(config: dict[str, Any]) -> dict[str, Any]:
    return run_trial(config["trial"])


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
        child = _find_child(uri, experiment, parent_id, trial.key)
        tags = child.data.tags if child is not None else {}
        if _completed(child, evaluate_k):
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


def _cell(stats: dict[str, float] | None) -> str:
    if not stats:
        return "-"
    sd = stats.get("sd")
    spread = f" ± {sd:.2f}" if sd is not None else ""
    return f"{stats['mean']:.2f}{spread} ({int(stats['n'])})"


def render_summary(result: SweepResult):
    """A table per grid point: trials finished/failed and mean ± sd (n) of the main figures."""
    from rich.table import Table

    names = ["val/loss", "val/kl", "latent/perplexity", "val/cluster_acc"]
    seen = {name for figures in result.aggregates.values() for name in figures}
    names = [n for n in names if n in seen] + sorted(n for n in seen if n.startswith("test/")
                                                     and (n.endswith("/loss") or "/nll_" in n or "bits" in n))
    table = Table(title=f"sweep {result.parent_run_id} ({result.experiment}): mean ± sd (n)")
    for column in ["grid point", "finished", "failed", *names]:
        table.add_column(column, justify="left" if column == "grid point" else "right")
    for point, figures in result.aggregates.items():
        mine = [o for o in result.outcomes if o.trial.point == point]
        table.add_row(point, str(sum(o.outcome == "finished" for o in mine)), str(result.failed_by_point.get(point, 0)),
                      *[_cell(figures.get(name)) for name in names])
    return table
