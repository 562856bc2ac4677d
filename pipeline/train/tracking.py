"""The MLflow run's lifecycle, driver side: create it, reopen it, count a driver restart, log the
final artifacts and the model (a grid model as its tokenizer pyfunc), end it.

Every MLflow call of the project is in one of four modules, by owner: this one; rank 0's
asynchronous logger `pipeline.train.run_logger`; the registry, run search and the loading of a
run's model (`load_model`) in `pipeline.ops.tracking`; `pipeline evaluate`'s lookups in
`pipeline.evaluate_tracking` — plus the pyfunc MLflow loads, `pipeline.tokens.serving`.
The driver creates exactly one run per training run (`start_run`) and hands its id to the
Ray workers; inside the workers only rank 0 logs, through a `RunLogger`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import RunStatus, RunTag
from mlflow.tracking import MlflowClient

import pipeline
from pipeline.config import RunConfig

DEFAULT_STORE = "mlflow.db"
MODEL_NAME = "model"  # the LoggedModel every training run logs
# The pyfunc a grid run logs (models from code: MLflow runs this file, nothing is unpickled).
TOKENIZER_MODEL_CODE = Path(pipeline.__file__).resolve().parent / "tokens" / "serving.py"


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


def param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite store) when it does not exist."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=_default_artifact_root(tracking_uri, experiment))


def start_run(config: RunConfig, *, tracking_uri: str, manifest_digest: str, trigger: str = "manual",
              extra_tags: dict[str, str] | None = None) -> str:
    """Create the run (and the experiment if new), log params, tags and the resolved config."""
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, config.tracking.experiment)
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
    params = [mlflow.entities.Param(k, param_value(v)) for k, v in sorted(config.flat().items())]
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


def count_restart(tracking_uri: str, run_id: str, reason: str) -> int:
    """Increment the run's `restarts` tag; returns the new count. (A restarted worker group counts
    through its `RunLogger`, which does not wait for MLflow.)"""
    client = MlflowClient(tracking_uri)
    count = int(client.get_run(run_id).data.tags.get("restarts", "0")) + 1
    client.log_batch(run_id, tags=[RunTag("restarts", str(count)), RunTag("last_restart", reason)])
    return count


def log_artifact_files(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def _model_requirements() -> list[str]:
    """Explicit requirements: MLflow's inference of them re-imports the model in a subprocess
    (10-30 s here). The package itself travels with the model (``code_paths``)."""
    import torch

    # MLflow warns that it logs torch "2.13.0+cpu" as "torch==2.13.0": that is what we want.
    logging.getLogger("mlflow.utils.requirements_utils").setLevel(logging.ERROR)
    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pydantic>=2", "pyyaml"]


@contextlib.contextmanager
def fluent_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model, pyfunc/pytorch load_model) reads a process-global
    store, and `mlflow.set_tracking_uri` also exports it as $MLFLOW_TRACKING_URI. Both are put back
    afterwards: left behind, the variable would beat the tracking.uri of every later run this
    process starts (the environment comes before the config, `resolve_tracking_uri`)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the global and the variable alike


def log_model(tracking_uri: str, run_id: str, model: Any, input_example: Any) -> None:
    """Log the torch model (flat and mixture models: the reconstruction) with a signature inferred
    from an example batch."""
    import torch
    from mlflow.models import infer_signature

    requirements = _model_requirements()
    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).numpy()
    signature = infer_signature(input_example, output)
    package = Path(pipeline.__file__).resolve().parent
    with fluent_store(tracking_uri), mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=input_example,
                                 pip_requirements=requirements, code_paths=[str(package)])


def tokenizer_signature(image_shape: tuple[int, int, int], grid: tuple[int, int]) -> Any:
    """What a grid model's pyfunc takes and returns: uint8 images [-1, C, H, W] -> int64 codes [-1, h, w]."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, *grid))]))


def log_tokenizer_model(tracking_uri: str, run_id: str, *, config: RunConfig, weights: Path,
                        image_shape: tuple[int, int, int], grid: tuple[int, int], categories: int,
                        input_example: Any = None) -> None:
    """Log a grid model as the pyfunc of ``pipeline/tokens/serving.py``: ``predict`` turns uint8 images
    [B, C, H, W] into int64 codes [B, h, w]. Its artifacts are the raw weights (a state_dict,
    ``weights``) and the resolved config; the image shape travels in ``model_config``."""
    requirements = _model_requirements()
    package = Path(pipeline.__file__).resolve().parent
    shape, grid = [int(v) for v in image_shape], [int(v) for v in grid]
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(config_yaml(config))
        with fluent_store(tracking_uri), mlflow.start_run(run_id=run_id):
            mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(TOKENIZER_MODEL_CODE),
                artifacts={"weights": str(weights), "config": str(config_file)},
                model_config={"image_shape": shape}, signature=tokenizer_signature(tuple(shape), tuple(grid)),
                input_example=input_example, pip_requirements=requirements, code_paths=[str(package)],
                metadata={"tokenizer": {"image_shape": shape, "grid": grid, "codebook_size": int(categories),
                                        "input": "uint8 images [B, C, H, W]",
                                        "output": "int64 codes [B, h, w] (argmax of the posterior)"}})


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
