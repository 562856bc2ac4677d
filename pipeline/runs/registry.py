"""A run's logged model and the Model Registry: log the model (a grid model as its tokenizer
pyfunc, the others with MLflow's pytorch flavour), register versions, read and move aliases (the
champion). Which run deserves the champion alias is `pipeline.ops.champion`'s decision."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import pipeline
from pipeline.config import RunConfig
from pipeline.runs.store import config_yaml, fluent_store

MODEL_NAME = "model"  # the LoggedModel every training run logs
CHAMPION = "champion"  # the alias of a registered model's best version
# The pyfunc a grid run logs (models from code: MLflow runs this file, nothing is unpickled).
TOKENIZER_MODEL_CODE = Path(pipeline.__file__).resolve().parent / "tokens" / "serving.py"


# --- logging the model ----------------------------------------------------------------------------


def _model_requirements() -> list[str]:
    """Explicit requirements: MLflow's inference of them re-imports the model in a subprocess
    (10-30 s here). The package itself travels with the model (``code_paths``)."""
    import torch

    # MLflow warns that it logs torch "2.13.0+cpu" as "torch==2.13.0": that is what we want; and it says
    # at INFO that it validates the input example, which it does on every log.
    logging.getLogger("mlflow.utils.requirements_utils").setLevel(logging.ERROR)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pydantic>=2", "pyyaml"]


def log_model(tracking_uri: str, run_id: str, model: Any, input_example: Any) -> None:
    """Log the torch model (flat and mixture models: the reconstruction) with a signature inferred
    from an example batch."""
    import mlflow.pytorch
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
    import mlflow.pyfunc

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


def logged_model(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> Any:
    """The MLflow 3 LoggedModel named ``name`` ("model") that the run logged, or None."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    named = [m for m in models if m.name == name]
    return named[0] if named else None


def logged_model_of_run(tracking_uri: str, run_id: str, name: str = MODEL_NAME):
    """The LoggedModel named ``name`` that the run logged, or None."""
    return logged_model(MlflowClient(tracking_uri), run_id, name)


# --- registered versions and aliases ---------------------------------------------------------------


def register_model_version(tracking_uri: str, name: str, run_id: str, tags: dict[str, Any] | None = None):
    """Register the run's logged model as a new version of `name` (created if new); returns the ModelVersion."""
    client = MlflowClient(tracking_uri)
    model = logged_model(client, run_id)
    if model is None:
        raise LookupError(f"run {run_id} has no logged model named 'model' to register")
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)  # "Waiting up to 300 s"
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # MLflow's sqlite registry looks the logged model up through a client of the process-global store
    # (MlflowClient() inside create_model_version), whatever store `client` names: point it here.
    with fluent_store(tracking_uri):
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


def champion_run_id(tracking_uri: str, model: str) -> str | None:
    """The run whose version of ``model`` holds the champion alias, or None."""
    incumbent = model_version_by_alias(tracking_uri, model, CHAMPION)
    return None if incumbent is None else incumbent.run_id


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
