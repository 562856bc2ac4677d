"""End to end on a real S3-protocol server (moto, loopback): `pipeline data ... --out s3://`, then
training on 2 Ray workers reading s3:// with checkpoints in s3:// (in the slow run; the default run
trains so on two Ray nodes in tests/test_multinode.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from moto_s3 import moto_server, s3_environment
from pipeline.config import load_config
from pipeline.data import read_manifest
from pipeline.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from pipeline.train.trainer import TrainingError, train

REPO = Path(__file__).resolve().parents[1]
BUCKET = "pipeline-e2e"


@pytest.fixture(scope="module")
def s3():
    """moto on loopback and AWS_* in the environment (what s3fs and the processes we start read)."""
    with moto_server() as endpoint, s3_environment(endpoint):
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def s3_ray():
    """moto on loopback, AWS_* in the environment, and a Ray cluster started *after* that, so the
    raylet and every Ray worker inherit the endpoint and dummy credentials (as on a real cluster,
    where each node's environment provides them). The session cluster, if any, is restarted after."""
    import ray

    had_cluster = ray.is_initialized()
    if had_cluster:
        ray.shutdown()
    with moto_server() as endpoint, s3_environment(endpoint):
        fsspec.filesystem("s3").mkdir(BUCKET)
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
        try:
            yield endpoint
        finally:
            ray.shutdown()
    if had_cluster:  # give the rest of the session the cluster conftest's ray_cluster promised
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())


# ~75 s; the default run trains from S3 with checkpoints in S3 (data.verify, the final checkpoint loaded
# from S3, no credentials logged) in tests/test_multinode.py::test_two_workers_land_on_two_nodes_with_checkpoints_in_s3
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_from_s3_with_checkpoints_in_s3(s3_ray, tmp_path, tracking_uri) -> None:
    url = f"s3://{BUCKET}/digits"
    proc = cli("data", "digits", "--out", url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(url)
    assert manifest.splits["train"].samples == 1297
    assert fsspec.filesystem("s3").exists(f"{BUCKET}/digits/train-00000.tar")

    config = load_config(REPO / "configs" / "digits-categorical.yaml",
                         [f"data.url={url}", f"tracking.uri={tracking_uri}", f"train.storage=s3://{BUCKET}/ckpt",
                          "train.epochs=1", "data.verify=true"])
    result = train(config)
    assert result.epochs == 1 and math.isfinite(result.val_loss)
    assert result.checkpoint_path and result.checkpoint_path.startswith(f"s3://{BUCKET}/ckpt/")
    # the final checkpoint in S3 is the real one: it loads and stands at the run's last step
    s3 = fsspec.filesystem("s3")
    local = tmp_path / "checkpoint"
    local.mkdir()
    s3.get(f"{result.checkpoint_path.removeprefix('s3://')}/{CHECKPOINT_FILE}", str(local / CHECKPOINT_FILE))
    state = load_checkpoint(local)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (result.steps, 1, 0)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset.url"] == url
    # credentials never reach the logged config
    logged = json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert "testing" not in logged and "AWS_" not in logged


def test_unreachable_dataset_fails_before_workers(s3, tracking_uri) -> None:
    config = load_config(REPO / "configs" / "digits-categorical.yaml",
                         [f"data.url=s3://{BUCKET}/no-such-dataset", f"tracking.uri={tracking_uri}"])
    with pytest.raises(TrainingError, match=f"no manifest.json at s3://{BUCKET}/no-such-dataset/manifest.json"):
        train(config)


def test_deformed_mnist_writes_to_s3_in_parallel(s3, mnist_dir) -> None:
    url = f"s3://{BUCKET}/deformed"
    proc = cli("data", "deformed-mnist", "--source", str(mnist_dir), "--samples", "1200", "--out", url,
               "--processes", "2", "--samples-per-shard", "5000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(url)
    assert [manifest.splits[s].samples for s in ("train", "val", "test")] == [1200, 10_000, 10_000]
    again = cli("data", "deformed-mnist", "--source", str(mnist_dir), "--samples", "1200", "--out", url,
                "--processes", "2", "--samples-per-shard", "5000")
    assert again.returncode == 0 and "wrote 0 shards, reused 5 finished" in " ".join(again.stderr.split())
    assert read_manifest(url).digest() == manifest.digest()
    # what the two worker processes wrote is the deterministic function of (seed, index)
    from pipeline.data.deformed import deformed_sample
    from pipeline.data.reader import ReadOptions, ShardReader
    from pipeline.data.sources import load_mnist_splits

    source = load_mnist_splits(str(mnist_dir))["train"]
    reader = ShardReader(ReadOptions(verify=True))
    samples = list(reader.read_shard(manifest, url, manifest.splits["train"].shards[0], start=1195))
    assert [key for key, _, _ in samples] == [f"train-{i:09d}" for i in range(1195, 1200)]
    assert all(np.array_equal(image[0], deformed_sample(source, 0, i)[0]) and label == source.labels[i]
               for i, (_, image, label) in zip(range(1195, 1200), samples))
