"""The MLflow calls of `pipeline.ops`: model registry (versions, the champion alias), run search,
loading a logged model. The run lifecycle is `pipeline.train.tracking`'s; these act on finished runs."""

from __future__ import annotations

import logging
from typing import Any

from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Tags on an existing (possibly finished) run, in one request."""
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
    try:
        return MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def model_versions_of_run(tracking_uri: str, name: str, run_id: str) -> list:
    try:
        return list(MlflowClient(tracking_uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    except MlflowException:
        return []


def set_model_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, str(version))


def load_pytorch_model(tracking_uri: str, model_uri: str, map_location: str = "cpu"):
    """Load a logged torch model (runs:/..., models:/...) from the given store."""
    import mlflow.pytorch  # imports torch: only where a model is loaded

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


def registered_version(tracking_uri: str, run_id: str) -> str:
    """``models:/<name>/<version>`` of the run's newest registered model version, else ``runs:/<run_id>``
    (what a token dataset names as the model that wrote it)."""
    try:
        versions = list(MlflowClient(tracking_uri).search_model_versions(f"run_id = '{run_id}'"))
    except MlflowException:
        versions = []
    if not versions:
        return f"runs:/{run_id}"
    newest = max(versions, key=lambda v: int(v.version))
    return f"models:/{newest.name}/{newest.version}"
