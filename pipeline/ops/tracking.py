"""The MLflow calls of `pipeline.ops`: model registry (versions, the champion alias), run search,
and loading a run's model: `load_model`, the one way from a run or model URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/RUN_ID/model``, a bare RUN_ID) to its config and rebuilt VAE, with
weights loaded by ``torch.load(weights_only=True)``. `pipeline encode`/`decode`, `Tokenizer`, the
tokenizer pyfunc and warm start load through it. The run lifecycle is `pipeline.train.tracking`'s;
these act on finished runs."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import RunConfig
from pipeline.train.tracking import MODEL_NAME, resolve_tracking_uri

if TYPE_CHECKING:
    from pipeline.models import VAE

WEIGHTS_ARTIFACT = "checkpoint/model.pt"  # the run's raw weights: a state_dict


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


def runs_tagged(tracking_uri: str, experiment: str, tags: dict[str, str]) -> list:
    """Runs of ``experiment`` carrying every tag of ``tags`` with that value (all pages), newest first;
    [] if the experiment does not exist. (A `pipeline sweep` finds its parent and children this way.)"""
    exp_id = experiment_id(tracking_uri, experiment)
    if exp_id is None:
        return []
    client = MlflowClient(tracking_uri)
    query = " and ".join(f"tags.`{key}` = '{_quoted(value)}'" for key, value in tags.items())
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


def start_parent_run(tracking_uri: str, experiment: str, *, run_name: str, tags: dict[str, Any],
                     params: dict[str, Any], files: dict[str, str] | None = None) -> str:
    """A run that holds no training of its own (a sweep's parent): tags, params, and text files
    ``files`` (artifact path -> content); the experiment is created if new. Returns its id."""
    from mlflow.entities import Param

    from pipeline.train.tracking import ensure_experiment, param_value

    client = MlflowClient(tracking_uri)
    run = client.create_run(ensure_experiment(tracking_uri, experiment), run_name=run_name,
                            tags={k: str(v) for k, v in tags.items()})
    run_id = run.info.run_id
    entries = [Param(k, param_value(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(entries), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=entries[start : start + 100])
    log_text_files(tracking_uri, run_id, files or {})
    return run_id


def log_text_files(tracking_uri: str, run_id: str, files: dict[str, str]) -> None:
    """Text artifacts (artifact path -> content); a later call with the same path replaces the file."""
    client = MlflowClient(tracking_uri)
    for path, text in files.items():
        client.log_text(run_id, text, path)


def log_summary(tracking_uri: str, run_id: str, metrics: dict[str, float], *, step: int,
                tags: dict[str, Any] | None = None) -> None:
    """Metrics at ``step`` and tags on an existing run, in batches MLflow accepts."""
    import time

    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start : start + 1000])
    if tags:
        set_run_tags(tracking_uri, run_id, tags)


def logged_model_of_run(tracking_uri: str, run_id: str, name: str = MODEL_NAME):
    """The MLflow 3 LoggedModel named ``name`` ("model") that the run logged, or None."""
    return _logged_model(MlflowClient(tracking_uri), run_id, name)


def _logged_model(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> Any:
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    named = [m for m in models if m.name == name]
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
    from pipeline.train.tracking import fluent_store

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


def load_pytorch_model(tracking_uri: str, model_uri: str, map_location: str = "cpu"):
    """The model at ``model_uri`` (runs:/..., models:/...) with its VAE as ``.vae``, on the CPU: rebuilt by
    `load_model` (weights_only) — only a model logged without raw weights (a run that predates them)
    is loaded by MLflow's pytorch flavour."""
    try:
        return load_model(model_uri, tracking_uri=tracking_uri)
    except NoWeightsError:
        import mlflow.pytorch  # imports torch: only where a model is loaded

        # The registry follows the tracking URI when none is set. set_registry_uri would stay behind in
        # the process (and in MLFLOW_REGISTRY_URI for its children) and send every later
        # MlflowClient(other_store) to this store's registry.
        from pipeline.train.tracking import fluent_store

        with fluent_store(tracking_uri):
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


# --- the way back: a run or model URI -> config + VAE (weights_only) ---------------------------------


class ModelLoadError(LookupError):
    """A run or model URI that names no loadable model; the message says which and why."""


class NoWeightsError(ModelLoadError):
    """The run logged no raw weights (a model logged before they were)."""


@dataclass
class LoadedModel:
    """A run's VAE rebuilt from its resolved config and raw weights, loaded with ``weights_only=True``."""

    run_id: str
    model_uri: str
    config: RunConfig
    model: "VAE"
    tags: dict[str, str]
    tracking_uri: str

    @property
    def vae(self) -> "VAE":
        return self.model

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.image_shape


def load_model(uri: str, *, tracking_uri: str | None = None, image_shape: tuple[int, ...] | None = None,
               manifest: Any = None) -> LoadedModel:
    """The model at ``uri`` — ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``
    or a bare RUN_ID — rebuilt from its config and raw weights (never an unpickled module).

    Files: a grid model's pyfunc artifacts (weights, config) when its logged model has them, else
    the run's ``config.yaml`` and ``checkpoint/model.pt``. Image shape: ``image_shape``, else the one
    the run's data settings make of ``manifest``'s samples, else the one recorded with the logged
    model (its model_config or signature), else the one of the run's own dataset."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id, logged = _resolve_model_uri(client, uri, tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ModelLoadError(f"no MLflow run {run_id!r} in {tracking_uri} ({err.error_code})") from None
    with tempfile.TemporaryDirectory() as tmp:
        config_file, weights, recorded = _model_files(client, tracking_uri, run_id, logged, Path(tmp))
        config = _parse_config_file(config_file, run_id)
        if image_shape is None and manifest is not None:
            image_shape = _dataset_shape(manifest, config, run_id)
        if image_shape is None:
            image_shape = recorded or _run_dataset_shape(run, config)
        model = rebuild_vae(config, weights, tuple(image_shape), run_id=run_id)
    return LoadedModel(run_id, uri, config, model, dict(run.data.tags), tracking_uri)


def rebuild_vae(config: RunConfig, weights: Path | str, image_shape: tuple[int, ...], *, run_id: str = "?") -> "VAE":
    """The VAE ``config`` describes for images of ``image_shape`` ((C, H, W), or (D,) for flat vectors),
    with the state_dict in ``weights`` loaded by ``torch.load(weights_only=True)``, in eval mode."""
    import torch

    from pipeline.models import build_vae

    try:
        if len(image_shape) == 1:
            model = build_vae(config.model, int(image_shape[0]), binarize=config.data.binarize)
        else:
            model = build_vae(config.model, image_shape=tuple(int(v) for v in image_shape),
                              binarize=config.data.binarize)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError) as err:  # weights that do not fit the config's shapes
        raise ModelLoadError(f"run {run_id}: cannot rebuild its model for images {list(image_shape)}: {err}") from None
    return model.eval()


def _resolve_model_uri(client: MlflowClient, uri: str, tracking_uri: str) -> tuple[str, Any]:
    """(run id, the LoggedModel or None) that ``uri`` names."""
    if uri.startswith("models:/"):
        rest = uri.removeprefix("models:/").strip("/")
        try:
            if "@" in rest:
                version = client.get_model_version_by_alias(*rest.split("@", 1))
            elif "/" in rest:
                version = client.get_model_version(*rest.split("/", 1))
            else:  # models:/<model id>
                logged = client.get_logged_model(rest)
                return logged.source_run_id, logged
            logged = _logged_model_of_version(client, version)
        except MlflowException as err:
            raise ModelLoadError(f"no model {uri} in the registry of {tracking_uri} ({err.error_code})") from None
        if not version.run_id:
            raise ModelLoadError(f"{uri} was not registered from a run: no config to rebuild it from")
        return version.run_id, logged
    if uri.startswith("runs:/"):
        run_id, _, name = uri.removeprefix("runs:/").partition("/")
        name = name.strip("/") or MODEL_NAME
    else:
        run_id, name = uri, MODEL_NAME
    try:
        return run_id, _logged_model(client, run_id, name)
    except MlflowException as err:
        raise ModelLoadError(f"no MLflow run {run_id!r} in {tracking_uri} ({err.error_code})") from None


def _logged_model_of_version(client: MlflowClient, version: Any) -> Any:
    """The LoggedModel a registered version was made from: its model id, or the one its source names."""
    source = version.source or ""
    model_id = getattr(version, "model_id", None) or (source.removeprefix("models:/") if source.startswith("models:/")
                                                      else None)
    if model_id:
        return client.get_logged_model(model_id)
    if source.startswith("runs:/") and version.run_id:
        return _logged_model(client, version.run_id, source.removeprefix("runs:/").partition("/")[2] or MODEL_NAME)
    return None


def _model_files(client: MlflowClient, tracking_uri: str, run_id: str, logged: Any,
                 tmp: Path) -> tuple[Path, Path, tuple[int, ...] | None]:
    """(config file, weights file, image shape recorded with the model or None), downloaded into ``tmp``."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    mlmodel = None
    if logged is not None:
        try:
            mlmodel = Model.load(download_artifacts(artifact_uri=f"{logged.artifact_location}/MLmodel",
                                                    dst_path=str(tmp / "mlmodel"), tracking_uri=tracking_uri))
        except (MlflowException, OSError):
            mlmodel = None
    pyfunc = (mlmodel.flavors.get("python_function") or {}) if mlmodel is not None else {}
    artifacts = pyfunc.get("artifacts") or {}
    if "weights" in artifacts and "config" in artifacts:  # a grid model's pyfunc: its own files
        files = [Path(download_artifacts(artifact_uri=f"{logged.artifact_location}/{artifacts[key]['path']}",
                                         dst_path=str(tmp / key), tracking_uri=tracking_uri))
                 for key in ("config", "weights")]
        shape = (pyfunc.get("config") or {}).get("image_shape")  # the pyfunc's model_config
        return files[0], files[1], tuple(shape) if shape else None
    try:
        config_file = Path(client.download_artifacts(run_id, "config.yaml", str(tmp)))
    except (MlflowException, OSError):
        raise ModelLoadError(f"run {run_id} has no config.yaml artifact: not a `pipeline train` run") from None
    try:
        weights = Path(client.download_artifacts(run_id, WEIGHTS_ARTIFACT, str(tmp)))
    except (MlflowException, OSError):
        raise NoWeightsError(f"run {run_id} has no raw weights ({WEIGHTS_ARTIFACT})") from None
    shape = None
    if mlmodel is not None and mlmodel.signature is not None and mlmodel.signature.inputs.is_tensor_spec():
        dims = mlmodel.signature.inputs.inputs[0].shape
        shape = tuple(int(v) for v in dims[1:]) if dims and len(dims) in (2, 4) else None
    return config_file, weights, shape


def _parse_config_file(path: Path, run_id: str) -> RunConfig:
    import yaml

    from pipeline.config import ConfigError, parse_config

    try:
        return parse_config(yaml.safe_load(path.read_text()) or {})
    except ConfigError as err:
        raise ModelLoadError(f"run {run_id}: its config.yaml no longer validates: {err}") from None


def _dataset_shape(manifest: Any, config: RunConfig, run_id: str) -> tuple[int, int, int]:
    from pipeline.data.contract import ImageTarget

    try:
        return ImageTarget.from_config(manifest.spec, config.data).shape
    except ValueError as err:
        raise ModelLoadError(f"run {run_id}: {err}") from None


def _run_dataset_shape(run: Any, config: RunConfig) -> tuple[int, int, int]:
    """The image shape the run trained on, from its dataset's manifest (models logged without one)."""
    from pipeline.data import DataError, read_manifest

    url = run.data.tags.get("dataset.url") or config.data.url
    try:
        manifest = read_manifest(url)
    except DataError as err:
        raise ModelLoadError(f"run {run.info.run_id}: no image shape recorded with its model, and its dataset "
                             f"is not readable: {err}") from None
    return _dataset_shape(manifest, config, run.info.run_id)
