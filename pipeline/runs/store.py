"""The MLflow store: which one (`resolve_tracking_uri`), its experiments, and a run's lifecycle —
find, start, reopen, end — with its params, tags, the restart count, artifacts and metric
histories; the search for runs by experiment or tags.

The driver creates exactly one run per training run (`start_run`) and hands its id to the Ray
workers; inside the workers only rank 0 logs, through `pipeline.runs.logger.RunLogger`. Every
function takes the store's URI and talks to it through ``MlflowClient(tracking_uri)``; the
process-global store is set only by `fluent_store`, around the MLflow calls that read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import pipeline
from pipeline.config import RunConfig

DEFAULT_STORE = "mlflow.db"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limits per log_batch request
MAX_METRICS_PER_BATCH = 1000
MAX_TAGS_PER_BATCH = 100
MAX_TAG_CHARS = 5000


def resolve_tracking_uri(flag: str | None = None, *, config: str | None = None) -> str:
    """The MLflow store, by the one precedence every command follows: the command's ``--tracking-uri``
    (``flag``), else $MLFLOW_TRACKING_URI, else the config's ``tracking.uri`` (``config``), else a
    sqlite file in the working directory.

    Relative sqlite paths are made absolute here, on the driver, because Ray workers
    do not share the driver's working directory.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or config or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare directory means a file store
        uri = Path(uri).resolve().as_uri()
    return uri


@contextlib.contextmanager
def fluent_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model) and its sqlite registry's create_model_version read a
    process-global store, and `mlflow.set_tracking_uri` also exports it as $MLFLOW_TRACKING_URI. Both
    are put back afterwards: left behind, the variable would beat the tracking.uri of every later run
    this process starts (the environment comes before the config, `resolve_tracking_uri`)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the global and the variable alike


def _client(store: MlflowClient | str) -> MlflowClient:
    return store if isinstance(store, MlflowClient) else MlflowClient(store)


# --- what a run records about its code and config -------------------------------------------------


def code_version() -> str:
    """Package version plus the git commit of the checkout it runs from, when there is one."""
    root = Path(pipeline.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"{pipeline.__version__}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return pipeline.__version__


def config_yaml(config: RunConfig) -> str:
    """The resolved config as the run logs it (``config.yaml``)."""
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# --- experiments ------------------------------------------------------------------------------------


def _default_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (not in whatever cwd we run from)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # servers and file stores pick their own artifact root
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / experiment).as_uri()


def experiment_id(tracking_uri: str, experiment: str) -> str | None:
    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return None if found is None else found.experiment_id


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite store) when it does not exist."""
    found = experiment_id(tracking_uri, experiment)
    if found is not None:
        return found
    return MlflowClient(tracking_uri).create_experiment(
        experiment, artifact_location=_default_artifact_root(tracking_uri, experiment))


def latest_experiment_name(tracking_uri: str) -> str | None:
    """The experiment of the most recently started run in the store (for commands without --experiment)."""
    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"],
                              max_results=1) if experiments else []
    if not runs:
        return None
    return client.get_experiment(runs[0].info.experiment_id).name


# --- a run's lifecycle ------------------------------------------------------------------------------


def start_run(config: RunConfig, *, tracking_uri: str, manifest_digest: str, trigger: str = "manual",
              extra_tags: dict[str, str] | None = None) -> str:
    """Create the training run (and the experiment if new), log params, tags and the resolved config."""
    client = MlflowClient(tracking_uri)
    version = code_version()
    run = client.create_run(
        ensure_experiment(tracking_uri, config.tracking.experiment),
        run_name=config.tracking.run_name,
        tags={
            "dataset.manifest_sha256": manifest_digest,
            # absolute, so `pipeline evaluate` finds the data from any working directory
            "dataset.url": config.data.url if "://" in config.data.url else str(Path(config.data.url).resolve()),
            "code_version": version,
            "mlflow.source.git.commit": version.split("+g")[-1] if "+g" in version else "",
            "trigger": trigger,
            "latent": f"{config.model.latent.kind}",
            **(extra_tags or {}),
        },
    )
    run_id = run.info.run_id
    _log_definition(client, run_id, config)
    return run_id


def _log_definition(client: MlflowClient, run_id: str, config: RunConfig) -> None:
    """What rebuilds a run's model: its params and its resolved config.yaml (logged last)."""
    logged = client.get_run(run_id).data.params
    log_params(client, run_id, {k: v for k, v in config.flat().items() if k not in logged})
    log_text_files(client, run_id, {"config.yaml": config_yaml(config)})


def start_parent_run(tracking_uri: str, experiment: str, *, run_name: str, tags: dict[str, Any],
                     params: dict[str, Any], files: dict[str, str] | None = None) -> str:
    """A run that holds no training of its own (a sweep's parent): tags, params, and text files
    ``files`` (artifact path -> content); the experiment is created if new. Returns its id."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(ensure_experiment(tracking_uri, experiment), run_name=run_name,
                            tags={k: str(v) for k, v in tags.items()})
    run_id = run.info.run_id
    log_params(client, run_id, params, max_chars=6000)
    log_text_files(client, run_id, files or {})
    return run_id


def log_params(store: MlflowClient | str, run_id: str, params: dict[str, Any], *, max_chars: int | None = None) -> None:
    """Params (lists and dicts as JSON), sorted by key, in batches MLflow accepts; each value cut
    at ``max_chars`` when given."""
    entries = [Param(k, param_value(v)[:max_chars]) for k, v in sorted(params.items())]
    client = _client(store)
    for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=entries[start : start + MAX_PARAMS_PER_BATCH])


def reopen_run(tracking_uri: str, run_id: str, config: RunConfig | None = None) -> None:
    """Mark a run RUNNING again for a resumed driver (its params stay as they are). With ``config``
    (the run's own), a run whose start was cut short between its creation and its config.yaml (a
    driver killed there) gets its params and config.yaml now, so it can be evaluated and loaded."""
    client = MlflowClient(tracking_uri)
    for stale in ("failure", "failure.step"):  # the reason an earlier attempt ended no longer holds
        if stale in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, stale)
    if config is not None and "config.yaml" not in {a.path for a in client.list_artifacts(run_id)}:
        _log_definition(client, run_id, config)
    client.update_run(run_id, status="RUNNING")


def end_run(tracking_uri: str, run_id: str, *, failed: bool = False, reason: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    if reason:
        client.set_tag(run_id, "failure", reason[:MAX_TAG_CHARS])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))


def get_run(tracking_uri: str, run_id: str):
    return MlflowClient(tracking_uri).get_run(run_id)


def find_run(tracking_uri: str, run_id_or_name: str, experiment: str | None = None):
    """A run by id, else by run name (newest first) in ``experiment`` or in any experiment."""
    client = MlflowClient(tracking_uri)
    try:
        return client.get_run(run_id_or_name)
    except MlflowException:
        pass
    experiments = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    ids = [e.experiment_id for e in experiments if e is not None]
    escaped = run_id_or_name.replace("'", "\\'")
    runs = client.search_runs(ids, f"attributes.run_name = '{escaped}'", order_by=["attributes.start_time DESC"],
                              max_results=1) if ids else []
    if not runs:
        raise LookupError(f"no MLflow run with id or name {run_id_or_name!r} in {tracking_uri}")
    return runs[0]


# --- tags, the restart count, metrics, artifacts ----------------------------------------------------


def set_run_tags(store: MlflowClient | str, run_id: str, tags: dict[str, Any]) -> None:
    """Tags on an existing (possibly finished) run, in batches MLflow accepts; setting a tag again
    with the same value changes nothing."""
    entries = [RunTag(k, str(v)) for k, v in tags.items()]
    client = _client(store)
    for start in range(0, len(entries), MAX_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=entries[start : start + MAX_TAGS_PER_BATCH])


def count_restart(store: MlflowClient | str, run_id: str, reason: str, restart_id: str | None = None) -> int:
    """+1 on the run's `restarts` tag (and `last_restart` = ``reason``), once per ``restart_id``;
    returns the count. The ids counted so far are kept in the tag `restarts.ids`, so the same restart
    delivered again (a retry, a checkpoint's pending rows sent by the next rank 0, a fallback file
    replayed twice) is not counted twice. Without an id, the call is one restart of its own."""
    client = _client(store)
    restart_id = restart_id or uuid.uuid4().hex[:12]
    tags = client.get_run(run_id).data.tags
    counted = [i for i in tags.get("restarts.ids", "").split(",") if i]
    count = int(tags.get("restarts", "0"))
    if restart_id in counted:
        return count
    ids = ",".join([*counted, restart_id])[-MAX_TAG_CHARS:]  # MLflow's tag limit: the oldest ids go first
    set_run_tags(client, run_id, {"restarts": count + 1, "last_restart": reason, "restarts.ids": ids})
    return count + 1


def log_summary(tracking_uri: str, run_id: str, metrics: dict[str, float], *, step: int,
                tags: dict[str, Any] | None = None) -> None:
    """Metrics at ``step`` and tags on an existing run, in batches MLflow accepts."""
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH])
    if tags:
        set_run_tags(client, run_id, tags)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list:
    """Every logged value of metric ``key`` (MLflow `Metric`s), by step."""
    return sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)


def last_step(tracking_uri: str, run_id: str, key: str) -> int:
    """The last step the run logged ``key`` at (0 if never)."""
    return max((m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)), default=0)


def log_artifact_files(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def log_text_files(store: MlflowClient | str, run_id: str, files: dict[str, str]) -> None:
    """Text artifacts (artifact path -> content); a later call with the same path replaces the file."""
    client = _client(store)
    for path, text in files.items():
        client.log_text(run_id, text, path)


def download_config(tracking_uri: str, run_id: str) -> str:
    """The resolved config.yaml a run logged at its start."""
    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(tracking_uri).download_artifacts(run_id, "config.yaml", tmp)
        return Path(path).read_text()


# --- run search ---------------------------------------------------------------------------------------


def search_experiment_runs(tracking_uri: str, experiment: str) -> list:
    """Every run of the experiment (all pages), newest first; [] if the experiment does not exist."""
    return _search(tracking_uri, experiment, "")


def runs_tagged(tracking_uri: str, experiment: str, tags: dict[str, str]) -> list:
    """Runs of ``experiment`` carrying every tag of ``tags`` with that value (all pages), newest first;
    [] if the experiment does not exist. (A `pipeline sweep` finds its parent and children this way.)"""
    return _search(tracking_uri, experiment, " and ".join(f"tags.`{key}` = '{_quoted(value)}'"
                                                          for key, value in tags.items()))


def _search(tracking_uri: str, experiment: str, query: str) -> list:
    exp_id = experiment_id(tracking_uri, experiment)
    if exp_id is None:
        return []
    client = MlflowClient(tracking_uri)
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], query, order_by=["attributes.start_time DESC"], max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quoted(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


# --- the driver's machine -------------------------------------------------------------------------------


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0) -> Iterator[None]:
    """MLflow's system metrics (``system/*``: CPU, memory, disk, network; GPU when NVML answers)
    of the driver's machine, sampled every ``interval_s`` while the block runs (the training).
    A resumed run continues its system-metric steps. Monitoring problems never fail training."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started monitoring" lines
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=tracking_uri)
        monitor.start()
    except Exception:  # noqa: BLE001 - e.g. psutil missing: training goes on without them
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            # finish() joins the sampling thread, which may sit in MLflow's own HTTP retries (minutes)
            # when the tracking server is down: wait a few seconds, never the run's end.
            stopper = threading.Thread(target=monitor.finish, name="system-metrics-stop", daemon=True)
            stopper.start()
            stopper.join(timeout=5.0)
