"""Shared fixtures: one real local Ray cluster for the session, real datasets on disk; and which
tests run one at a time."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = Path(os.environ.get("PIPELINE_MNIST_DIR", SHARED_DATA / "mnist"))
BINARIZED_MNIST_DIR = Path(os.environ.get("PIPELINE_BINARIZED_MNIST_DIR", SHARED_DATA / "binarized_mnist"))

# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`). The tests that
# start Ray clusters, training runs, MLflow servers or a browser form one group, which xdist runs on
# one worker, one test after another, as a serial run would (two of them at once on two cores would
# starve each other's health checks); the tests that start none of these run on the other worker
# beside them. A test is in the group when its file is named here or it uses one of these fixtures.
ONE_AT_A_TIME_FILES = {
    "test_bench.py", "test_bench_images.py", "test_dvae_train.py", "test_encode.py", "test_evaluate.py",
    "test_fault.py", "test_images_train.py", "test_multinode.py", "test_ops_cluster.py", "test_ops_registry.py",
    "test_photo_tokenizer.py", "test_progress.py", "test_recovery.py", "test_run_logger.py", "test_sweep.py",
    "test_tokenizer.py", "test_train.py", "test_ui.py",
}
ONE_AT_A_TIME_FIXTURES = {"ray_cluster", "digits_progress_run", "grid_dvae_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in ONE_AT_A_TIME_FILES or ONE_AT_A_TIME_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("one-at-a-time"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, loopback, no dashboard) shared by the training tests."""
    import ray

    # address="local": never attach to a stale cluster left in /tmp/ray by another run.
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory) -> str:
    from pipeline.data import load_digits_splits, write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards(load_digits_splits(), str(out), source="sklearn digits", samples_per_shard=500, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def digits_progress_run(ray_cluster, digits_dataset, empty_mlflow_db, tmp_path_factory) -> dict:
    """One real `pipeline train --progress` in this process, on the session's Ray cluster: digits, 2
    epochs, 3 categorical variables of 4 classes (64 codes: few enough for exact test figures).
    Its printed output is what tests/test_progress.py reads; its run is what tests/test_evaluate.py
    evaluates (the only consumer that writes to it: test figures into the same run).
    Returns the CLI result and, when it succeeded, the run id and its sqlite store."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = tmp_path_factory.mktemp("digits-progress")
    uri = new_store(empty_mlflow_db, root / "mlflow.db")
    config = Path(__file__).resolve().parents[1] / "configs" / "digits-categorical.yaml"
    result = CliRunner().invoke(app, [
        "train", str(config), "-o", f"data.url={digits_dataset}", "-o", "train.epochs=2",
        "-o", "model.latent.variables=3", "-o", "model.latent.categories=4",
        "-o", f"train.storage={root / 'ray'}", "--tracking-uri", uri, "--progress"],
        env={"PIPELINE_PROGRESS": None, "MLFLOW_TRACKING_URI": None})
    found = re.search(r"run_id: ([0-9a-f]{32})", result.stdout)  # after the live line's terminal codes
    return {"result": result, "run_id": found and found.group(1), "uri": uri}


# configs/images-dvae.yaml at test widths: 16x16 RGB -> a 4x4 grid of 32-way codes, 2 short epochs of 4
# steps, a checkpoint every 3 steps (mid-epoch at steps 3 and 6: tests/test_fault.py resumes from one).
GRID_DVAE = {"images": 64, "batch": 16, "epochs": 2, "log_every": 2, "checkpoint_every": 3,
             "experiment": "tokenizer-test"}
GRID_DVAE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "images-dvae.yaml"


def grid_dvae_overrides(dataset: str, uri: str, storage: Path) -> list[str]:
    """The overrides of configs/images-dvae.yaml that make the session's grid dVAE run (`grid_dvae_run`)."""
    return [f"data.url={dataset}", f"tracking.uri={uri}", f"train.storage={storage}",
            f"tracking.experiment={GRID_DVAE['experiment']}", "data.image_size=[16, 16]", "model.channels=[8]",
            "model.codebook_dim=48", "model.latent.categories=32", f"train.batch_size={GRID_DVAE['batch']}",
            f"train.epochs={GRID_DVAE['epochs']}", f"train.log_every={GRID_DVAE['log_every']}",
            f"train.checkpoint_every_steps={GRID_DVAE['checkpoint_every']}", "train.lr_warmup_steps=2",
            "train.kl_warmup_steps=4", "model.latent.tau_cosine.steps=6"]


@pytest.fixture(scope="session")
def grid_dvae_run(ray_cluster, empty_mlflow_db, tmp_path_factory) -> dict:
    """One tiny grid dVAE trained by a real `pipeline train` process on the session's Ray cluster
    (--address), 2 workers, on RGB photo crops, each rank logging the keys it trained per step
    (tests/train_hooks.py), and registered as champion by the command. Read by tests/test_dvae_train.py
    (schedules, code use, images, the logged EMA model), tests/test_tokenizer.py (the tokenizer
    loaded, encoded, served) and tests/test_fault.py (the uninterrupted twin of a killed run); none
    changes the run."""
    import subprocess
    import sys

    import train_hooks
    from pipeline.config import load_config
    from test_image_stream import photo_crops, write_image_dataset

    root = tmp_path_factory.mktemp("grid-dvae")
    uri = new_store(empty_mlflow_db, root / "mlflow.db")
    dataset, samples = str(root / "photos"), root / "samples"
    write_image_dataset(dataset, photo_crops(GRID_DVAE["images"], seed=2), per_shard=16)
    config_path = GRID_DVAE_CONFIG
    overrides = grid_dvae_overrides(dataset, uri, root / "ray")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= train_hooks.env(train_hooks.sample_log(samples))  # the driver hands the hook to every worker
    gcs = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", str(config_path), "--address", gcs,
                           *[arg for o in overrides for arg in ("-o", o)]], env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("run_id:"))
    return {"uri": uri, "run_id": run_id, "dataset": dataset, "samples": samples, "root": root, "stdout": proc.stdout,
            "config": load_config(config_path, overrides), "storage": root / "ray"}


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store as MLflow itself creates it on first use (its schema migrations take
    seconds on a busy 2-core machine): made once, copied by `new_store` for each store a test starts."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def new_store(empty_mlflow_db: Path, path: Path) -> str:
    """A fresh sqlite MLflow store at ``path`` (a copy of the empty one); its tracking URI."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_mlflow_db, path)
    return f"sqlite:///{path}"


@pytest.fixture
def tracking_uri(tmp_path, empty_mlflow_db) -> str:
    """This test's own empty sqlite MLflow store. (A test that checks no store gets created names its own path.)"""
    return new_store(empty_mlflow_db, tmp_path / "mlflow.db")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST idx files expected in {MNIST_DIR} (set PIPELINE_MNIST_DIR)")
    return MNIST_DIR


@pytest.fixture(autouse=True)
def _one_tests_mlflow_store_stays_in_it():
    """A test that points MLflow's fluent API at its store (mlflow.set_tracking_uri, which also exports
    $MLFLOW_TRACKING_URI) must not send later tests' runs there: the environment beats a config's
    tracking.uri. Put both back after every test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)

