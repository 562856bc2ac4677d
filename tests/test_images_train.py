"""RGB training end to end: JPEG photo crops of varying sizes -> 2 Ray workers with random crops and
flips -> one MLflow run with bits/dim, RGB grids and a model whose signature is an image batch;
`pipeline evaluate` adds test bits/dim to the same run. Real Ray cluster, real sqlite MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import load_config
from pipeline.evaluate import evaluate_run
from pipeline.train.trainer import TrainingError, train
from test_image_stream import photo_crops, write_image_dataset

REPO = Path(__file__).resolve().parents[1]
IMAGES_CONFIG = REPO / "configs" / "images-conv.yaml"


@pytest.fixture(scope="module")
def rgb_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("rgb") / "photos")
    write_image_dataset(url, photo_crops(64, seed=1), per_shard=16)  # sizes vary: 40..71 px a side
    return url


def _config(dataset: str, uri: str, tmp_path: Path, *extra: str):
    small = ["model.channels=[8, 16]", "model.hidden=[64]", "model.latent.variables=8", "model.latent.categories=8",
             "data.image_size=[24, 24]", "train.batch_size=16", "train.log_every=2"]
    return load_config(IMAGES_CONFIG, [f"data.url={dataset}", f"tracking.uri={uri}", f"train.storage={tmp_path / 'ray'}",
                                       *small, *extra])


@pytest.mark.timeout(400)
def test_rgb_training_on_two_workers_logs_bits_per_dim_and_rgb_grids(ray_cluster, rgb_dataset, tmp_path, tracking_uri):
    result = train(_config(rgb_dataset, tracking_uri, tmp_path, "train.epochs=2"))
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.workers"] == "2"
    history = [m.value for m in client.get_metric_history(result.run_id, "val/bits_per_dim")]
    loss = [m.value for m in client.get_metric_history(result.run_id, "val/loss")]
    # ~9 bits/dim untrained (wide logistics: worse than the uniform 8 bits), falling as it learns
    assert len(history) == 2 and all(0 < b < 16 for b in history) and history[1] < history[0]
    assert history[-1] == pytest.approx(loss[-1] / (3 * 24 * 24 * math.log(2)), rel=1e-6)

    local = Path(client.download_artifacts(result.run_id, "images", str(tmp_path)))
    for name in ("reconstructions.png", "prior_samples.png"):
        grid = Image.open(local / name)
        assert grid.mode == "RGB", name
        pixels = np.asarray(grid).astype(int)
        assert (pixels[..., 0] != pixels[..., 1]).any(), f"{name} is grey"

    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{result.run_id}'")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    shape = mlflow.models.get_model_info(f"models:/{models[0].model_id}").signature.inputs.inputs[0].shape
    assert list(shape)[1:] == [3, 24, 24]

    evaluation = evaluate_run(result.run_id, split="val", importance_samples=4, batch_size=10,
                              tracking_uri=tracking_uri)
    assert 0 < evaluation.metrics["val/bits_per_dim"] < 16
    assert evaluation.metrics["val/bits_per_dim_is_k4"] <= evaluation.metrics["val/bits_per_dim"] + 1e-6
    assert "val/bits_per_dim" in client.get_run(result.run_id).data.metrics


def test_varying_sizes_without_image_size_are_refused_before_any_run(rgb_dataset, tmp_path, tracking_uri):
    config = _config(rgb_dataset, tracking_uri, tmp_path, "data.image_size=null")
    with pytest.raises(TrainingError, match="data.image_size"):
        train(config)
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()
