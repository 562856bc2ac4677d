"""Several Ray nodes on one machine (ray.cluster_utils.Cluster: each node its own raylet):
workers spread across nodes, checkpoints on S3 (moto on loopback), a node lost mid-epoch."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import fsspec
import pytest
from mlflow.tracking import MlflowClient
from moto_s3 import moto_server, s3_environment
from test_fault import _assert_each_sample_trained_once, _assert_history_clean, _records, _wait_for_step

from pipeline.config import load_config
from pipeline.data import load_digits_splits, steps_per_epoch, write_shards
from pipeline.train.trainer import TrainingError, train

REPO = Path(__file__).resolve().parents[1]
BUCKET = "pipeline-multinode"


@pytest.fixture(scope="module")
def cluster():
    """A head with 0 CPUs (it only coordinates) and 3 worker nodes with 1 CPU each; AWS_* set
    before the nodes start so every raylet and worker reaches the loopback S3 server."""
    import ray
    from ray.cluster_utils import Cluster

    had_cluster = ray.is_initialized()
    if had_cluster:
        ray.shutdown()
    with moto_server() as endpoint, s3_environment(endpoint):
        fsspec.filesystem("s3").mkdir(BUCKET)
        write_shards(load_digits_splits(), f"s3://{BUCKET}/digits", source="digits", samples_per_shard=200,
                     progress=False)
        nodes = Cluster(initialize_head=True, connect=False,
                        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        for _ in range(3):
            nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=nodes.address, logging_level=logging.WARNING)
        try:
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()
    if had_cluster:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)


def _config(tmp_path: Path, uri: str, *extra: str):
    return load_config(REPO / "configs" / "digits-categorical.yaml",
                       [f"data.url=s3://{BUCKET}/digits", f"tracking.uri={uri}",
                        f"train.storage=s3://{BUCKET}/ckpt-{tmp_path.name}", *extra])


@pytest.mark.timeout(400)
def test_workers_spread_over_nodes_with_checkpoints_in_s3(cluster, tmp_path, tracking_uri):
    result = train(_config(tmp_path, tracking_uri, "train.epochs=1"))
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cluster.nodes"] == "2"  # spread: 2 workers, 2 different nodes
    worker_nodes = {node.node_id for node in cluster.worker_nodes}
    assert set(run.data.tags["cluster.node_ids"].split(",")) <= worker_nodes
    assert result.checkpoint_path.startswith(f"s3://{BUCKET}/")


def test_local_storage_is_refused_on_a_multi_node_cluster(cluster, tmp_path, tracking_uri):
    config = _config(tmp_path, tracking_uri, "train.epochs=1", f"train.storage={tmp_path / 'ckpt'}")
    with pytest.raises(TrainingError, match="local path, but the cluster has 4 nodes"):
        train(config)


@pytest.mark.timeout(600)
def test_losing_a_node_mid_epoch_recovers_on_the_rest(cluster, tmp_path, tracking_uri):
    config = _config(tmp_path, tracking_uri, "train.epochs=3", "train.checkpoint_every_steps=5",
                     f"train.sample_log={tmp_path / 'samples'}", "tracking.experiment=node-loss")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", train(config)), daemon=True)
    runner.start()
    victim = _wait_for_step(Path(config.train.sample_log), rank=1, step=28)  # epoch 1 (0-based), mid-epoch
    node = next(n for n in cluster.worker_nodes if n.node_id == victim["node"])
    cluster.remove_node(node, allow_graceful=False)  # its raylet and workers die at once
    runner.join(timeout=500)
    assert "r" in result, "training did not recover from the lost node"
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("node-loss").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert int(runs[0].data.tags["restarts"]) >= 1
    _assert_history_clean(client, result["r"].run_id)
    records = _records(Path(config.train.sample_log))
    assert victim["node"] not in {r["node"] for r in records if r["step"] > victim["step"] + 5}
    steps = steps_per_epoch(1297, 2, 32)
    for epoch in (0, 1, 2):
        assert _assert_each_sample_trained_once(records, epoch, steps, 64) == (0, 0)
