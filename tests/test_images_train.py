"""A newcomer's two commands on RGB photos, end to end: `pipeline data images` over an image folder
(JPEG/PNG/WebP of varying sizes, class sub-folders), then `pipeline train configs/images-conv.yaml`
on 2 Ray workers with random crops and flips -> one MLflow run with bits/dim, RGB grids and a model
whose signature is an image batch; `pipeline evaluate` adds test bits/dim to the same run.
Real processes, a real local Ray cluster, a real sqlite MLflow store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from photos import write_image_folder
from pipeline.config import load_config
from pipeline.train.trainer import TrainingError, train
from test_image_stream import photo_crops, write_image_dataset

REPO = Path(__file__).resolve().parents[1]
IMAGES_CONFIG = REPO / "configs" / "images-conv.yaml"
SMALL = ["model.channels=[8]", "model.codebook_dim=48", "model.latent.categories=8", "data.image_size=[24, 24]",
         "train.batch_size=16", "train.log_every=2", "train.lr_warmup_steps=2", "train.kl_warmup_steps=4",
         "model.latent.tau_cosine.steps=6"]


def _pipeline(*args: str, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"pipeline {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.timeout(500)
def test_image_folder_to_rgb_run_in_two_commands(tmp_path: Path) -> None:
    folder, dataset = tmp_path / "my-photos", tmp_path / "data" / "my-images"
    write_image_folder(folder, per_class=24, grey=2, seed=4)  # 72 photos crops, 24..96 px a side, 3 classes
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)

    (folder / "licence.txt").write_text("not an image")
    made = _pipeline("data", "images", "--source", str(folder), "--out", str(dataset), "--size", "32",
                     "--val-fraction", "0.2", "--test-fraction", "0.15", "--samples-per-shard", "16", cwd=tmp_path,
                     env=env, timeout=200)
    assert "skipped 1 file that is not an image: 1 .txt" in made.stderr
    trained = _pipeline("train", str(IMAGES_CONFIG), "-o", f"data.url={dataset}", "-o", "train.epochs=2",
                        "-o", f"train.storage={tmp_path / 'ray'}", *[a for o in SMALL for a in ("-o", o)],
                        cwd=tmp_path, env=env, timeout=400)
    run_id = next(line.split()[-1] for line in trained.stdout.splitlines() if line.startswith("run_id:"))

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.workers"] == "2"
    assert run.data.params["data.resize"] == "random-crop" and run.data.params["data.hflip"] == "True"
    # train.use_gpu and train.precision are auto by default: this CPU-only cluster makes them CPUs and fp32
    assert (run.data.params["train.use_gpu"], run.data.params["train.precision"]) == ("False", "fp32")
    history = [m.value for m in client.get_metric_history(run_id, "val/bits_per_dim")]
    loss = [m.value for m in client.get_metric_history(run_id, "val/loss")]
    # ~9 bits/dim untrained (wide logistics: worse than the uniform 8 bits), falling as it learns
    assert len(history) == 2 and all(0 < b < 16 for b in history) and history[1] < history[0]
    assert history[-1] == pytest.approx(loss[-1] / (3 * 24 * 24 * math.log(2)), rel=1e-6)

    local = Path(client.download_artifacts(run_id, "images", str(tmp_path)))
    for name in ("reconstructions.png", "prior_samples.png"):
        grid = Image.open(local / name)
        assert grid.mode == "RGB", name
        pixels = np.asarray(grid).astype(int)
        assert (pixels[..., 0] != pixels[..., 1]).any(), f"{name} is grey"

    import mlflow

    mlflow.set_tracking_uri(uri)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    shape = mlflow.models.get_model_info(f"models:/{models[0].model_id}").signature.inputs.inputs[0].shape
    assert list(shape)[1:] == [3, 24, 24]

    evaluated = _pipeline("evaluate", run_id, "--split", "test", "-k", "4", "--batch-size", "10", "--json",
                          cwd=tmp_path, env=env, timeout=200)
    metrics = json.loads(evaluated.stdout)["metrics"]
    assert 0 < metrics["test/bits_per_dim"] < 16
    # both estimate the same model's cost (the IS bound is tighter in expectation; two noisy estimates here)
    assert metrics["test/bits_per_dim_is_k4"] == pytest.approx(metrics["test/bits_per_dim"], abs=0.1)
    assert "test/bits_per_dim" in client.get_run(run_id).data.metrics


def test_varying_sizes_without_image_size_are_refused_before_any_run(tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # not created: no run may start
    dataset = str(tmp_path / "photos")
    write_image_dataset(dataset, photo_crops(20, seed=1), per_shard=10)  # sizes vary: 40..71 px a side
    config = load_config(IMAGES_CONFIG, [f"data.url={dataset}", f"tracking.uri={tracking_uri}", "data.image_size=null"])
    with pytest.raises(TrainingError, match="data.image_size"):
        train(config)
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()
