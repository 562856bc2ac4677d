"""Every MLflow call of the project lives here.

The driver creates exactly one run per training run (`start_run`) and hands its id to
the Ray workers; inside the workers only rank 0 builds a `RunLogger` and logs. Metrics
go out with `log_batch` (one HTTP request per log step, not one per metric).
"""

from __future__ import annotations

import json
import logging
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


def start_run(config: RunConfig, *, tracking_uri: str, manifest_digest: str, trigger: str = "manual") -> str:
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
            "dataset.url": config.data.url,
            "code_version": version,
            "mlflow.source.git.commit": version.split("+g")[-1] if "+g" in version else "",
            "trigger": trigger,
            "latent": f"{config.model.latent.kind}",
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
    """Rank 0's handle on the run: metrics in batches, tags."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


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
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=input_example)
    mlflow.end_run()


def end_run(tracking_uri: str, run_id: str, *, failed: bool = False, reason: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    if reason:
        client.set_tag(run_id, "failure", reason[:5000])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))


def get_run(tracking_uri: str, run_id: str):
    return MlflowClient(tracking_uri).get_run(run_id)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


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
