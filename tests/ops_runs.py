"""Cheap real MLflow runs for the registry/compare/UI tests: tiny VAE, real logged model, no Ray."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.config import RunConfig, parse_config
from pipeline.models import build_vae
from pipeline.runs import store
from pipeline.runs.logger import RunLogger
from pipeline.train.artifacts import Reconstructor


def tiny_config(experiment: str, name: str, **extra: str) -> RunConfig:
    overrides = [f"tracking.experiment={experiment}", f"tracking.run_name={name}", "model.hidden=[8]",
                 "model.latent.variables=2", "model.latent.categories=3", *[f"{k}={v}" for k, v in extra.items()]]
    return parse_config({"data": {"url": "/data/digits"}}, overrides)


def make_run(uri: str, experiment: str, name: str, *, val_loss: float, digest: str = "a" * 64,
             trigger: str = "manual", test_metrics: dict[str, float] | None = None, seed: int = 0,
             val_loss_onehot: float | None = None, overrides: dict[str, str] | None = None) -> str:
    """A FINISHED run with params, val/loss (val/loss_onehot when given; test metrics), a logged
    model and its raw weights (checkpoint/model.pt), as training leaves it. `overrides` are config settings (e.g. model.latent.estimator)."""
    import torch

    config = tiny_config(experiment, name, **(overrides or {}))
    run_id = store.start_run(config, tracking_uri=uri, manifest_digest=digest, trigger=trigger)
    logger = RunLogger(uri, run_id)
    onehot = {} if val_loss_onehot is None else {"val/loss_onehot": val_loss_onehot}
    early = {k: v + 5.0 for k, v in {"val/loss": val_loss, **onehot}.items()}
    logger.log_metrics({**early, "perf/samples_per_s": 1000.0 + seed}, step=1)
    logger.log_metrics({"val/loss": val_loss, **onehot, **(test_metrics or {})}, step=2)
    logger.close()
    torch.manual_seed(seed)
    model = Reconstructor(build_vae(config.model, 64)).eval()
    _log_model_fast(uri, run_id, model, torch.rand(2, 64).numpy())
    with tempfile.TemporaryDirectory() as tmp:  # the raw weights a model is loaded from (weights_only)
        weights = Path(tmp) / "model.pt"
        torch.save(model.vae.state_dict(), weights)
        store.log_artifact_files(uri, run_id, [weights], artifact_path="checkpoint")
    store.end_run(uri, run_id)
    return run_id


def _log_model_fast(uri: str, run_id: str, model, example) -> None:
    """registry.log_model's call with the requirements given: inferring them (a subprocess that
    imports the model) takes 10-30 s per model on a loaded 2-core machine."""
    import mlflow

    from pipeline.runs.store import fluent_store

    with fluent_store(uri), mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=["torch"])
