"""Every MLflow call of the project lives here.

The driver creates exactly one run per training run (`start_run`) and hands its id to
the Ray workers; inside the workers only rank 0 builds a `RunLogger` and logs. Metrics
go out with `log_batch` (one HTTP request per log step, not one per metric).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

import pipeline
from pipeline.config import RunConfig

DEFAULT_STORE = "mlflow.db"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory.

    Relative sqlite paths are made absolute here, on the driver, because Ray workers
    do not share the driver's working directory.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare directory means a file store
        uri = Path(uri).resolve().as_uri()
    return uri


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


def _default_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (not in whatever cwd we run from)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # servers and file stores pick their own artifact root
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / experiment).as_uri()


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def start_run(config: RunConfig, *, tracking_uri: str, manifest_digest: str, trigger: str = "manual",
              extra_tags: dict[str, str] | None = None) -> str:
    """Create the run (and the experiment if new), log params, tags and the resolved config."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(
            config.tracking.experiment, artifact_location=_default_artifact_root(tracking_uri, config.tracking.experiment)
        )
    else:
        experiment_id = experiment.experiment_id
    version = code_version()
    run = client.create_run(
        experiment_id,
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
    params = [mlflow.entities.Param(k, _param_value(v)) for k, v in sorted(config.flat().items())]
    for start in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=params[start : start + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_yaml(config))
        client.log_artifact(run_id, str(path))
    return run_id


def config_yaml(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class RunLogger:
    """Rank 0's handle on the run: metrics delivered in order by a background thread.

    Training never waits on MLflow: `log_metrics` queues a batch; the thread delivers it,
    retrying with backoff while the server is unreachable (nothing is dropped). After a
    restart, steps the run already holds are not logged again (MLflow would keep both
    values), so every metric's history stays strictly increasing without duplicates.
    `close` waits for delivery; what still cannot be delivered goes to a JSONL file
    that `pipeline replay-metrics FILE` delivers later.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, resumed: bool = False, fallback_dir: str | None = None,
                 max_backoff_s: float = 10.0, min_interval_s: float = 1.0) -> None:
        # MLflow's own HTTP retries would block our thread for minutes; we retry ourselves.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.fallback_dir = fallback_dir
        self.max_backoff_s = max_backoff_s
        self.min_interval_s = min_interval_s
        self.logged_through: dict[str, int] = self._last_steps() if resumed else {}
        self.late_batches = 0  # delivered only after at least one failed attempt
        self.failed_attempts = 0
        self._queue: queue.Queue[list[Metric] | None] = queue.Queue()
        self._closing, self._deadline = False, 0.0
        self._undelivered: list[list[Metric]] = []
        self._thread = threading.Thread(target=self._deliver, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def _last_steps(self) -> dict[str, int]:
        run = self.client.get_run(self.run_id)
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                for key in run.data.metrics}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()
                 if step > self.logged_through.get(key, -1)]
        for metric in batch:
            self.logged_through[metric.key] = step
        for start in range(0, len(batch), 1000):
            self._queue.put(batch[start : start + 1000])

    def _deliver(self) -> None:
        """Send queued batches, at most one write per `min_interval_s`: each write (sqlite or HTTP)
        costs this process Python time next to the training thread, so what queued meanwhile
        goes in the same write."""
        last_write, stop = 0.0, False
        while not stop and (first := self._queue.get()) is not None:
            pause = self.min_interval_s - (time.monotonic() - last_write)
            if pause > 0 and not self._closing:
                time.sleep(pause)
            metrics = list(first)
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                metrics += more
            for start in range(0, len(metrics), 1000):  # MLflow's limit per log_batch
                self._send(metrics[start : start + 1000])
            last_write = time.monotonic()

    def _send(self, batch: list[Metric]) -> None:
        delay, failed = 0.5, False
        while True:
            try:
                self.client.log_batch(self.run_id, metrics=batch)
                break
            except Exception:  # noqa: BLE001 - server down, network, 5xx: keep the batch, retry
                failed = True
                self.failed_attempts += 1
                if self._closing and time.monotonic() > self._deadline:
                    self._undelivered.append(batch)
                    break
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        self.late_batches += failed

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def close(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Deliver what is queued (waiting up to ``timeout_s``); returns a delivery report."""
        self._deadline = time.monotonic() + timeout_s
        self._closing = True
        self._queue.put(None)
        self._thread.join()
        report: dict[str, Any] = {"late_batches": self.late_batches, "failed_attempts": self.failed_attempts}
        if self._undelivered:
            report["fallback_file"] = self._write_fallback(self._undelivered)
        return report

    def _write_fallback(self, batches: list[list[Metric]]) -> str:
        folder = Path(self.fallback_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mlflow-pending-{self.run_id}.jsonl"
        with path.open("a") as out:
            for batch in batches:
                for m in batch:
                    out.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri, "key": m.key,
                                          "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
        return str(path.resolve())


def replay_metrics(path: str | Path, tracking_uri: str | None = None) -> int:
    """Deliver metrics a run could not deliver (its JSONL fallback file); returns how many."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_target: dict[tuple[str, str], list[Metric]] = {}
    for row in lines:
        target = (tracking_uri or row["tracking_uri"], row["run_id"])
        by_target.setdefault(target, []).append(Metric(row["key"], row["value"], row["timestamp"], row["step"]))
    for (uri, run_id), metrics in by_target.items():
        client = MlflowClient(uri)
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return len(lines)


def count_restart(tracking_uri: str, run_id: str, reason: str) -> int:
    """Increment the run's `restarts` tag; returns the new count."""
    client = MlflowClient(tracking_uri)
    count = int(client.get_run(run_id).data.tags.get("restarts", "0")) + 1
    client.set_tag(run_id, "restarts", str(count))
    client.set_tag(run_id, "last_restart", reason)
    return count


def log_artifact_files(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def log_model(tracking_uri: str, run_id: str, model: Any, input_example: Any) -> None:
    """Log the torch model with a signature inferred from an example batch."""
    import torch
    from mlflow.models import infer_signature

    # MLflow warns that it logs torch "2.13.0+cpu" as "torch==2.13.0": that is what we want.
    logging.getLogger("mlflow.utils.requirements_utils").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(tracking_uri)
    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).numpy()
    signature = infer_signature(input_example, output)
    # Explicit requirements: MLflow's inference of them re-imports the model in a subprocess
    # (10-30 s here). The package travels with the model so loading it needs no install of ours.
    package = Path(pipeline.__file__).resolve().parent
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pydantic>=2", "pyyaml"]
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=input_example,
                                 pip_requirements=requirements, code_paths=[str(package)])
    mlflow.end_run()


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run RUNNING again for a resumed driver (its params stay as they are)."""
    client = MlflowClient(tracking_uri)
    for stale in ("failure", "failure.step"):  # the reason an earlier attempt ended no longer holds
        if stale in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, stale)
    client.update_run(run_id, status="RUNNING")


def find_run(tracking_uri: str, run_id_or_name: str, experiment: str | None = None):
    """A run by id, else by run name (newest first) in ``experiment`` or in any experiment."""
    client = MlflowClient(tracking_uri)
    try:
        return client.get_run(run_id_or_name)
    except mlflow.exceptions.MlflowException:
        pass
    experiments = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    ids = [e.experiment_id for e in experiments if e is not None]
    escaped = run_id_or_name.replace("'", "\\'")
    runs = client.search_runs(ids, f"attributes.run_name = '{escaped}'", order_by=["attributes.start_time DESC"],
                              max_results=1) if ids else []
    if not runs:
        raise LookupError(f"no MLflow run with id or name {run_id_or_name!r} in {tracking_uri}")
    return runs[0]


def download_config(tracking_uri: str, run_id: str) -> str:
    """The resolved config.yaml a run logged at its start."""
    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(tracking_uri).download_artifacts(run_id, "config.yaml", tmp)
        return Path(path).read_text()


def end_run(tracking_uri: str, run_id: str, *, failed: bool = False, reason: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    if reason:
        client.set_tag(run_id, "failure", reason[:5000])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))


def get_run(tracking_uri: str, run_id: str):
    return MlflowClient(tracking_uri).get_run(run_id)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


# --- Operations: model registry, champion alias, run search (used by pipeline.ops) ---------------


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Tags on an existing (possibly finished) run, in one request."""
    from mlflow.entities import RunTag

    MlflowClient(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def experiment_id(tracking_uri: str, experiment: str) -> str | None:
    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return None if found is None else found.experiment_id


def search_experiment_runs(tracking_uri: str, experiment: str) -> list:
    """Every run of the experiment (all pages), newest first; [] if the experiment does not exist."""
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(tracking_uri, experiment)
    if exp_id is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def logged_model_of_run(tracking_uri: str, run_id: str):
    """The MLflow 3 LoggedModel named "model" that the run logged, or None."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    named = [m for m in models if m.name == "model"]
    return named[0] if named else None


def register_model_version(tracking_uri: str, name: str, run_id: str, tags: dict[str, Any] | None = None):
    """Register the run's logged model as a new version of `name` (created if new); returns the ModelVersion."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    model = logged_model_of_run(tracking_uri, run_id)
    if model is None:
        raise LookupError(f"run {run_id} has no logged model named 'model' to register")
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)  # "Waiting up to 300 s"
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source=model.model_uri, run_id=run_id, model_id=model.model_id,
                                       tags={k: str(v) for k, v in (tags or {}).items()})


def model_version_by_alias(tracking_uri: str, name: str, alias: str):
    """The ModelVersion holding `alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def model_versions_of_run(tracking_uri: str, name: str, run_id: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(MlflowClient(tracking_uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    except MlflowException:
        return []


def set_model_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, str(version))


def load_pytorch_model(tracking_uri: str, model_uri: str, map_location: str = "cpu"):
    """Load a logged torch model (runs:/..., models:/...) from the given store."""
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow.pytorch.load_model(model_uri, map_location=map_location)


def latest_experiment_name(tracking_uri: str) -> str | None:
    """The experiment of the most recently started run in the store (for commands without --experiment)."""
    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"],
                              max_results=1) if experiments else []
    if not runs:
        return None
    return client.get_experiment(runs[0].info.experiment_id).name


# ---------------------------------------------------------------- `pipeline evaluate` (pipeline/evaluate.py)

class RunNotFoundError(LookupError):
    """No run with this id in the tracking store."""


def run_for_evaluation(tracking_uri: str, run_id: str, destination: Path) -> dict[str, Any]:
    """What evaluating a finished run needs, fetched into ``destination``: its tags, the path of its
    resolved ``config.yaml`` and of its raw weights ``checkpoint/model.pt`` (None when not logged),
    and the last step it logged ``val/loss`` at (0 if none), so evaluation metrics follow training's."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RunNotFoundError(f"no MLflow run {run_id!r} in {tracking_uri} ({err.error_code})") from None
    files: dict[str, Path | None] = {}
    for key, artifact in (("config", "config.yaml"), ("weights", "checkpoint/model.pt")):
        try:
            files[key] = Path(client.download_artifacts(run_id, artifact, str(destination)))
        except (MlflowException, OSError):
            files[key] = None
    steps = [m.step for m in client.get_metric_history(run_id, "val/loss")]
    return {"tags": dict(run.data.tags), "files": files, "last_step": max(steps, default=0)}


def load_run_model(tracking_uri: str, run_id: str) -> Any:
    """The model logged with `log_model` (runs before raw weights were logged), on the CPU."""
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pytorch.load_model(f"runs:/{run_id}/model", map_location="cpu")


def log_evaluation(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int,
                   tags: dict[str, Any] | None = None) -> None:
    """Evaluation figures into the training run (one batch), plus descriptive tags."""
    now = int(time.time() * 1000)
    client = MlflowClient(tracking_uri)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
                     tags=[mlflow.entities.RunTag(k, str(v)) for k, v in (tags or {}).items()])


def log_data_health(logger: RunLogger, step: int, metrics: dict[str, float], skipped_shards: Any = ()) -> None:
    """Data-layer health on rank 0: ``data/skipped_samples``, ``data/read_retries``, cache hits/misses
    (from `pipeline.data.reader.DataHealth.metrics()`, summed over ranks by the caller), and the tag
    ``data.skipped_shards`` listing every shard with skipped samples (URLs; MLflow caps tags at 5000 chars)."""
    logger.log_metrics(metrics, step)
    names = sorted(set(skipped_shards))
    if names:
        listed = ", ".join(names)
        logger.set_tags({"data.skipped_shards": listed if len(listed) <= 5000 else listed[:4980] + f" ... ({len(names)} shards)"})
