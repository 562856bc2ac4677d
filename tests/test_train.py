"""Training end to end on a real local Ray cluster with a real sqlite MLflow store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.data import Split, read_manifest, steps_per_epoch, write_shards
from pipeline.train.trainer import TrainingError, train
from test_progress import LIVE_LINE

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits-categorical.yaml"

STEP_METRICS = ["train/loss", "train/recon", "train/kl", "train/temperature", "train/lr", "train/grad_norm",
                "perf/samples_per_s", "perf/data_wait_frac"]
SWITCH = 5  # straight-through from this global step on in the CLI run
EPOCH_METRICS = ["val/loss", "val/recon", "val/kl", "latent/perplexity"]


def _config(dataset: str, uri: str, tmp_path: Path, *extra: str):
    return load_config(DIGITS_CONFIG, [f"data.url={dataset}", f"tracking.uri={uri}",
                                       f"train.storage={tmp_path / 'ray'}", *extra])


def test_cli_trains_digits_on_two_workers(digits_dataset, tmp_path):
    """The main command: one MLflow run with every metric, val loss falling, artifacts logged. Its
    stdout is a pipe (not a terminal, as in CI or a log file) and neither --progress nor
    $PIPELINE_PROGRESS says otherwise: the driver draws no live line, the per-epoch lines print."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    env.pop("PIPELINE_PROGRESS", None)  # the driver left to decide
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(DIGITS_CONFIG), "-o", f"data.url={digits_dataset}",
         "-o", "train.epochs=2", "-o", f"train.storage={tmp_path / 'ray'}",
         "-o", f"model.latent.straight_through_from_step={SWITCH}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("run_id:"))
    assert "val/loss (-ELBO):" in proc.stdout and "pipeline ui" in proc.stdout
    # Not on a terminal: rank 0's per-epoch lines only, no live progress line (nor its erase codes).
    assert "[rank 0] epoch 2/2 step" in proc.stdout and "val -ELBO" in proc.stdout, proc.stdout[-3000:]
    assert not re.search(LIVE_LINE, proc.stdout) and "samples/s" not in proc.stdout and "\x1b[2K" not in proc.stdout

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits-categorical")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    variables = int(run.data.params["model.latent.variables"])
    for key in STEP_METRICS + EPOCH_METRICS + [f"val/kl_latent_{i}" for i in range(variables)]:
        assert key in run.data.metrics, key
    val = [m.value for m in sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.step)]
    assert len(val) == 2 and val[1] < val[0]
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == sorted(set(steps))
    # Gumbel-Softmax up to model.latent.straight_through_from_step, straight-through from it on (logged step = steps done).
    estimator = {m.step: m.value for m in client.get_metric_history(run_id, "train/straight_through")}
    assert {v for s, v in estimator.items() if s <= SWITCH} == {0.0}
    assert {v for s, v in estimator.items() if s > SWITCH} == {1.0}
    assert run.data.params["train.workers"] == "2"
    assert len(run.data.tags["dataset.manifest_sha256"]) == 64
    assert run.data.tags["code_version"].startswith("0.")
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "images")}
    assert {"config.yaml", "images/reconstructions.png", "images/prior_samples.png"} <= artifacts
    models = client.search_logged_models([experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["model"]

    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = torch.rand(3, 1, 8, 8)  # an image batch, pixels in [0, 1]
    assert model(x).shape == (3, 1, 8, 8)


def _unequal_dataset(root: Path) -> str:
    rng = np.random.default_rng(0)
    def split(n):
        return Split(images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, n))
    # samples_per_shard=50 over 113 train samples -> shards of 50, 50, 13 samples
    write_shards({"train": split(113), "val": split(17)}, str(root), source="random", samples_per_shard=50,
                 progress=False)
    return str(root)


@pytest.mark.timeout(300)
def test_unequal_shards_keep_ranks_in_lockstep(ray_cluster, tmp_path, tracking_uri):
    dataset = _unequal_dataset(tmp_path / "uneven")
    manifest = read_manifest(dataset)
    assert sorted(s.samples for s in manifest.splits["train"].shards) == [13, 50, 50]
    config = _config(dataset, tracking_uri, tmp_path, "train.epochs=2", "train.batch_size=10", "data.shuffle_buffer=7")
    result = train(config)
    # rank 0 reports its own count; DDP would have hung had rank 1 run a different number of steps
    assert result.steps == 2 * steps_per_epoch(113, 2, 5) == 2 * 11
    assert MlflowClient(tracking_uri).get_run(result.run_id).info.status == "FINISHED"


def test_missing_dataset_fails_before_workers(tmp_path):
    missing = tmp_path / "no-such-dataset"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(DIGITS_CONFIG), "-o", f"data.url={missing}",
         "-o", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
    assert "RayTrainWorker" not in proc.stderr + proc.stdout
    assert not (tmp_path / "m.db").exists()  # no run was created for a dataset that is not there


def test_invalid_config_names_the_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(DIGITS_CONFIG), "-o", "train.workerz=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "train.workerz" in proc.stderr and "workers" in proc.stderr


def test_corrupt_shard_fails_naming_the_shard(ray_cluster, tmp_path, tracking_uri):
    dataset = _unequal_dataset(tmp_path / "corrupt")
    manifest = read_manifest(dataset)
    victim = Path(dataset) / manifest.splits["train"].shards[1].path
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    # max_failures=0: a corrupt shard fails every retry the same way (retries are for transient errors)
    config = _config(dataset, tracking_uri, tmp_path, "train.epochs=1", "train.batch_size=10", "train.max_failures=0")
    with pytest.raises(TrainingError) as err:
        train(config)
    assert victim.name in str(err.value)
    runs = MlflowClient(tracking_uri).search_runs([MlflowClient(tracking_uri).get_experiment_by_name("digits-categorical").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert victim.name in runs[0].data.tags["failure"]


def test_nan_loss_stops_and_marks_run_failed(ray_cluster, digits_dataset, tmp_path, tracking_uri):
    # An absurd learning rate drives the weights to inf within a few steps.
    config = _config(digits_dataset, tracking_uri, tmp_path, "train.epochs=1", "train.lr=1e20")
    with pytest.raises(TrainingError, match="non-finite loss at step"):
        train(config)
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("digits-categorical").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert int(run.data.tags["failure.step"]) >= 0


def test_corrupt_shard_is_skipped_and_counted_when_configured(ray_cluster, tmp_path, tracking_uri):
    dataset = _unequal_dataset(tmp_path / "skip")
    manifest = read_manifest(dataset)
    victim = Path(dataset) / manifest.splits["train"].shards[0].path
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # half of its 50 samples survive
    config = _config(dataset, tracking_uri, tmp_path, "train.epochs=1", "train.batch_size=10",
                     "data.on_corrupt=skip")
    result = train(config)
    # lockstep held: both ranks ran the full epoch although one lost samples
    assert result.steps == steps_per_epoch(113, 2, 5)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert 0 < run.data.metrics["data/skipped_samples"] <= 50
    assert victim.name in run.data.tags["data.skipped_shards"]
