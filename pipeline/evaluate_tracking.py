"""The MLflow calls of `pipeline evaluate` (pipeline/evaluate.py): fetch what a finished run
logged, load its model, log the evaluation figures back into it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.train.tracking import resolve_tracking_uri  # noqa: F401 - evaluate.py resolves the store through us


class RunNotFoundError(LookupError):
    """No run with this id in the tracking store."""


def run_for_evaluation(tracking_uri: str, run_id: str, destination: Path) -> dict[str, Any]:
    """What evaluating a finished run needs, fetched into ``destination``: its tags, the path of its
    resolved ``config.yaml`` and of its raw weights ``checkpoint/model.pt`` (None when not logged),
    and the last step it logged ``val/loss`` at (0 if none), so evaluation metrics follow training's."""
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
    """The run's logged model, its VAE as ``.vae``, on the CPU (for runs whose raw weights are not
    among the run's artifacts): `pipeline.ops.tracking.load_pytorch_model`."""
    from pipeline.ops.tracking import load_pytorch_model

    return load_pytorch_model(tracking_uri, f"runs:/{run_id}/model")


def log_evaluation(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int,
                   tags: dict[str, Any] | None = None) -> None:
    """Evaluation figures into the training run (one batch), plus descriptive tags."""
    now = int(time.time() * 1000)
    client = MlflowClient(tracking_uri)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
