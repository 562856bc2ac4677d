"""Shared fixtures: one real local Ray cluster for the session, real datasets on disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = Path(os.environ.get("PIPELINE_MNIST_DIR", SHARED_DATA / "mnist"))
BINARIZED_MNIST_DIR = Path(os.environ.get("PIPELINE_BINARIZED_MNIST_DIR", SHARED_DATA / "binarized_mnist"))


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


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


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

