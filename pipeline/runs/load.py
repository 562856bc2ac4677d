"""The way back from a run: a run or model URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN_ID/model``, a bare RUN_ID) -> its resolved config, its data target and its VAE,
rebuilt from the config with the raw weights loaded by ``torch.load(weights_only=True)`` (never an
unpickled module).

`load_model` serves `pipeline encode`/`decode`, `Tokenizer`, `pipeline export` and warm start
(`load_initial_weights`); `load_run` also reads the run's dataset, for `pipeline evaluate`;
`rebuild_vae` is the one rebuild, also of the driver's final checkpoint and of the tokenizer pyfunc.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import RunConfig
from pipeline.runs.registry import MODEL_NAME, logged_model
from pipeline.runs.store import resolve_tracking_uri

if TYPE_CHECKING:
    import torch

    from pipeline.models import VAE

WEIGHTS_ARTIFACT = "checkpoint/model.pt"  # the run's raw weights: a state_dict


class ModelLoadError(LookupError):
    """A run or model URI that names no loadable model; the message says which and why."""


class NoWeightsError(ModelLoadError):
    """The run logged no raw weights (a model logged before they were)."""


class RunDataError(ModelLoadError):
    """The run's dataset cannot be read, or does not fit the run's data settings."""


class WarmStartError(RuntimeError):
    """The model named by train.init_from cannot initialise this run's model."""


@dataclass
class LoadedModel:
    """A run's VAE rebuilt from its resolved config and raw weights, loaded with ``weights_only=True``;
    `load_run` adds the dataset it was read against (``data_url``, ``manifest``) and the data
    target (an `ImageTarget`: image size and channels) the run's settings make of it."""

    run_id: str
    model_uri: str
    config: RunConfig
    model: "VAE"
    tags: dict[str, str]
    tracking_uri: str
    data_url: str | None = None
    manifest: Any = None
    target: Any = None

    @property
    def vae(self) -> "VAE":
        return self.model

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.image_shape


@dataclass
class _RunFiles:
    """What a run or model URI names, its files downloaded: the run, its config, its raw weights
    (None when not logged) and the image shape recorded with its logged model (or None)."""

    run: Any
    config: RunConfig
    weights: Path | None
    recorded_shape: tuple[int, ...] | None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def require_weights(self) -> Path:
        if self.weights is None:
            raise NoWeightsError(f"run {self.run_id} has no raw weights ({WEIGHTS_ARTIFACT})")
        return self.weights


def load_model(uri: str, *, tracking_uri: str | None = None, image_shape: tuple[int, ...] | None = None,
               manifest: Any = None) -> LoadedModel:
    """The model at ``uri`` rebuilt from its config and raw weights.

    Files: a grid model's pyfunc artifacts (weights, config) when its logged model has them, else
    the run's ``config.yaml`` and ``checkpoint/model.pt``. Image shape: ``image_shape``, else the one
    the run's data settings make of ``manifest``'s samples, else the one recorded with the logged
    model (its model_config or signature), else the one of the run's own dataset."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = _fetch(uri, tracking_uri, Path(tmp))
        weights = files.require_weights()
        if image_shape is None and manifest is not None:
            image_shape = _target(manifest, files.config, files.run_id).shape
        if image_shape is None:
            image_shape = files.recorded_shape or _run_dataset_shape(files.run, files.config)
        model = rebuild_vae(files.config, weights, tuple(image_shape), run_id=files.run_id)
    return LoadedModel(files.run_id, uri, files.config, model, dict(files.run.data.tags), tracking_uri)


def load_run(uri: str, *, tracking_uri: str | None = None, data_url: str | None = None) -> LoadedModel:
    """The model at ``uri`` with its dataset: the manifest at ``data_url``, else at the run's
    ``dataset.url`` tag, else at its config's ``data.url``; the data target the run's data settings
    make of it; the VAE rebuilt for that target. The dataset is read before the weights are
    required, so a run whose data moved says so first (`RunDataError`)."""
    from pipeline.data import DataError, read_manifest

    tracking_uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = _fetch(uri, tracking_uri, Path(tmp))
        tags = dict(files.run.data.tags)
        url = data_url or tags.get("dataset.url") or files.config.data.url
        try:
            manifest = read_manifest(url)
        except DataError as err:
            raise RunDataError(f"dataset of run {files.run_id} not readable: {err}") from None
        target = _target(manifest, files.config, files.run_id, url)
        model = rebuild_vae(files.config, files.require_weights(), target.shape, run_id=files.run_id)
    return LoadedModel(files.run_id, uri, files.config, model, tags, tracking_uri, url, manifest, target)


def rebuild_vae(config: RunConfig, weights: "Path | str | dict[str, torch.Tensor]", image_shape: tuple[int, ...],
                *, run_id: str = "?") -> "VAE":
    """The VAE ``config`` describes for images of ``image_shape`` ((C, H, W), or (D,) for flat vectors),
    with the state_dict ``weights`` (or the file holding it, loaded by ``torch.load(weights_only=True)``),
    in eval mode."""
    import torch

    from pipeline.models import build_vae

    try:
        if len(image_shape) == 1:
            model = build_vae(config.model, int(image_shape[0]), binarize=config.model.binarize)
        else:
            model = build_vae(config.model, image_shape=tuple(int(v) for v in image_shape),
                              binarize=config.model.binarize)
        state = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:  # weights that do not fit the config's shapes
        raise ModelLoadError(f"run {run_id}: cannot rebuild its model for images {list(image_shape)}: {err}") from None
    return model.eval()


# --- warm start ---------------------------------------------------------------------------------------


def initial_state_dict(init_from: str, tracking_uri: str) -> dict[str, "torch.Tensor"]:
    """The VAE weights of a logged model (models:/NAME/VERSION, models:/NAME@champion, runs:/ID/model)."""
    try:
        loaded = load_model(init_from, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; say which URI failed
        raise WarmStartError(f"train.init_from={init_from}: cannot load the model: {err}") from err
    return {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}


def load_initial_weights(model: "torch.nn.Module", init_from: str, tracking_uri: str) -> None:
    """Copy the weights of the model ``init_from`` names into ``model``, refusing a different
    architecture by name. The per-worker loop calls it right after the model is built, and only when
    no checkpoint is being restored (a restore wins over the warm start); every rank may call it
    (DDP also broadcasts rank 0's weights when it wraps the model)."""
    state = initial_state_dict(init_from, tracking_uri)
    own = model.state_dict()
    mismatched = sorted(k for k in own.keys() | state.keys()
                        if k not in own or k not in state or own[k].shape != state[k].shape)
    if mismatched:
        raise WarmStartError(f"train.init_from={init_from}: architecture differs from this config "
                             f"(parameters {', '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''})")
    model.load_state_dict(state)


# --- from a URI to the run's files --------------------------------------------------------------------


def _fetch(uri: str, tracking_uri: str, tmp: Path) -> _RunFiles:
    client = MlflowClient(tracking_uri)
    run_id, logged = _resolve_model_uri(client, uri, tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ModelLoadError(f"no MLflow run {run_id!r} in {tracking_uri} ({err.error_code})") from None
    config_file, weights, recorded = _model_files(client, tracking_uri, run_id, logged, tmp)
    return _RunFiles(run, _parse_config_file(config_file, run_id), weights, recorded)


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
        return run_id, logged_model(client, run_id, name)
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
        return logged_model(client, version.run_id, source.removeprefix("runs:/").partition("/")[2] or MODEL_NAME)
    return None


def _model_files(client: MlflowClient, tracking_uri: str, run_id: str, logged: Any,
                 tmp: Path) -> tuple[Path, Path | None, tuple[int, ...] | None]:
    """(config file, weights file or None, image shape recorded with the model or None), downloaded into ``tmp``."""
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
        weights: Path | None = Path(client.download_artifacts(run_id, WEIGHTS_ARTIFACT, str(tmp)))
    except (MlflowException, OSError):
        weights = None
    shape = None
    if mlmodel is not None and mlmodel.signature is not None and mlmodel.signature.inputs.is_tensor_spec():
        dims = mlmodel.signature.inputs.inputs[0].shape
        shape = tuple(int(v) for v in dims[1:]) if dims and len(dims) in (2, 4) else None
    return config_file, weights, shape


def _parse_config_file(path: Path, run_id: str) -> RunConfig:
    import yaml

    from pipeline.config import ConfigError, parse_config

    try:
        return parse_config(yaml.safe_load(path.read_text()) or {}, source=f"config.yaml of run {run_id}")
    except ConfigError as err:
        raise ModelLoadError(f"run {run_id}: its config.yaml no longer validates: {err}") from None


def _target(manifest: Any, config: RunConfig, run_id: str, url: str | None = None) -> Any:
    """The `ImageTarget` (channels, size) the run's data settings make of ``manifest``'s samples."""
    from pipeline.data.contract import ImageTarget

    try:
        return ImageTarget.from_config(manifest.spec, config.data)
    except ValueError as err:
        raise RunDataError(f"run {run_id}{f' on {url}' if url else ''}: {err}") from None


def _run_dataset_shape(run: Any, config: RunConfig) -> tuple[int, int, int]:
    """The image shape the run trained on, from its dataset's manifest (models logged without one)."""
    from pipeline.data import DataError, read_manifest

    url = run.data.tags.get("dataset.url") or config.data.url
    try:
        manifest = read_manifest(url)
    except DataError as err:
        raise RunDataError(f"run {run.info.run_id}: no image shape recorded with its model, and its dataset "
                           f"is not readable: {err}") from None
    return _target(manifest, config, run.info.run_id).shape
