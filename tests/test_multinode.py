"""Several Ray nodes on this machine (a head with 0 CPUs + 2 worker nodes with 1 CPU each, one
raylet per node): workers spread across nodes, checkpoints and shards on the loopback S3 server,
local storage refused, and a worker node's raylet killed mid-epoch. `pipeline train --address`
runs as a separate driver process, as a user runs it against a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from mlflow.tracking import MlflowClient

from moto_s3 import moto_server, s3_environment
from pipeline.data import steps_per_epoch
from pipeline.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ray_nodes import ray_cluster_of_nodes
import train_hooks

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits-categorical.yaml"
BUCKET = "multinode"
DATA = f"s3://{BUCKET}/digits"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """moto, the digits shards in it, then the nodes (started after, so they inherit the endpoint)."""
    root = tmp_path_factory.mktemp("nodes")
    with moto_server() as endpoint, s3_environment(endpoint):
        fsspec.filesystem("s3").mkdir(BUCKET)
        made = subprocess.run([sys.executable, "-m", "pipeline", "data", "digits", "--out", DATA],
                              capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr[-3000:]
        with ray_cluster_of_nodes(root, worker_cpus=(1, 1)) as nodes:
            yield nodes


def _train(cluster, tmp_path: Path, *overrides: str, timeout: float = 500, wait: bool = True, env: dict | None = None):
    env = dict(cluster.env) | (env or {})
    env.pop("RAY_AUTH_MODE")  # the CLI must turn token auth on by itself for --address
    env |= {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    cmd = [sys.executable, "-m", "pipeline", "train", str(DIGITS_CONFIG), "--address", cluster.address,
           "-o", f"data.url={DATA}", "-o", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
           "-o", "tracking.register_model=false", *[arg for o in overrides for arg in ("-o", o)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _run(tmp_path: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return client, runs[0]


@pytest.mark.timeout(600)
def test_two_workers_land_on_two_nodes_with_checkpoints_in_s3(cluster, tmp_path):
    """Also the default run's training from S3 (shards written by `pipeline data digits --out s3://`, read
    with data.verify) with checkpoints in S3 (tests/test_s3.py trains so on one node, in the slow run)."""
    code, out = _train(cluster, tmp_path, "train.epochs=2", f"train.storage=s3://{BUCKET}/ckpt",
                       "tracking.experiment=spread", "data.verify=true")
    assert code == 0, out[-4000:]
    client, run = _run(tmp_path, "spread")
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset.url"] == DATA
    logged = json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert "testing" not in logged and "AWS_" not in logged  # the credentials never reach the logged config
    # the final checkpoint in S3 is the real one: it loads and stands at the run's last step
    steps = 2 * steps_per_epoch(1297, 2, 32)
    assert f"after 2 epochs, {steps} steps," in out
    s3 = fsspec.filesystem("s3")
    states = []
    for number, path in enumerate(p for p in s3.find(f"{BUCKET}/ckpt") if p.endswith(f"/{CHECKPOINT_FILE}")):
        local = tmp_path / "checkpoints" / str(number)
        local.mkdir(parents=True)
        s3.get(path, str(local / CHECKPOINT_FILE))
        states.append(load_checkpoint(local))
    final = max(states, key=lambda state: state["step"])
    assert (final["step"], final["epoch"], final["step_in_epoch"]) == (steps, 2, 0)
    assert run.data.tags["cluster.nodes"] == "2"
    node_ids = run.data.tags["cluster.node_ids"].split(",")
    assert len(set(node_ids)) == 2 and set(node_ids) == {n["id"] for n in cluster.nodes() if n["cpus"] > 0}  # never the 0-CPU head
    assert json.loads(run.data.tags["cluster.resources_per_worker"]) == {"CPU": 1.0, "GPU": 0}
    checkpoints = fsspec.filesystem("s3").find(f"{BUCKET}/ckpt")
    assert any(path.endswith(".pt") for path in checkpoints), checkpoints
    assert "local to this machine" in out  # the sqlite store: rank 0 could be on another node


@pytest.mark.timeout(300)
def test_local_storage_is_refused_on_several_nodes(cluster, tmp_path):
    code, out = _train(cluster, tmp_path, f"train.storage={tmp_path / 'ckpt'}", "tracking.experiment=refused")
    assert code == 1
    assert f"train.storage={tmp_path / 'ckpt'}" in out and "3 nodes" in out and "s3://" in out
    assert not (tmp_path / "ckpt").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was created


def _rows(path: Path) -> list[dict]:
    """The sample log's records; a line cut by SIGKILL (or still being written) is left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _wait_for_step(sample_log: Path, rank: int, step: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    path = sample_log / f"rank{rank}.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before the node could be killed"
        if path.exists():
            lines = _rows(path)
            if lines and lines[-1]["step"] >= step:
                return lines[-1]
        time.sleep(0.05)
    raise TimeoutError(f"rank {rank} never reached step {step}")


@pytest.mark.slow  # ~130 s; the default run keeps two nodes with checkpoints in S3 and a killed worker's restart
@pytest.mark.timeout(900)
def test_losing_a_worker_node_continues_on_the_rest(cluster, tmp_path):
    """Elastic 1..2 workers: lose rank 1's node mid-epoch (its raylet and every process on it
    SIGKILLed); training goes on on one worker from the last checkpoint, as the same MLflow run,
    and each global batch is the same."""
    epochs, batch = 4, 32
    sample_log = tmp_path / "samples"
    proc = _train(cluster, tmp_path, "train.workers=1..2", f"train.epochs={epochs}", f"train.batch_size={batch}",
                  "train.checkpoint_every_steps=10", "train.log_every=5", f"train.storage=s3://{BUCKET}/elastic",
                  "tracking.experiment=node-loss", wait=False, env=train_hooks.env(train_hooks.sample_log(sample_log)))
    try:
        victim = _wait_for_step(sample_log, rank=1, step=55, proc=proc)
        lost = next(node for node in cluster.workers if node.owns(victim["pid"]))
        lost.kill()
        out, _ = proc.communicate(timeout=700)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        _check_recovery(tmp_path, sample_log, victim, proc.returncode, epochs, batch)
    except (AssertionError, KeyError) as err:
        raise AssertionError(f"{err!r}\n--- driver output ---\n{out[-5000:]}") from None


def _check_recovery(tmp_path: Path, sample_log: Path, victim: dict, returncode: int, epochs: int, batch: int) -> None:
    assert returncode == 0
    client, run = _run(tmp_path, "node-loss")
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["restarts"]) >= 1
    assert run.data.tags["cluster.nodes"] == "1"  # the last worker group: the surviving node only
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has duplicated steps"
    records = [row for path in sample_log.glob("rank*.jsonl") for row in _rows(path)]
    steps = steps_per_epoch(1297, 2, batch // 2)
    assert max(r["step"] for r in records) == epochs * steps
    first_group = {r["pid"] for r in records if r["step"] == 1}
    assert victim["pid"] in first_group and len(first_group) == 2
    assert {r["pid"] for r in records if r["step"] == epochs * steps}.isdisjoint(first_group)  # a new group finished
    for epoch in range(epochs):
        _assert_each_global_batch_once([r for r in records if r["epoch"] == epoch], steps, batch)


def _assert_each_global_batch_once(records: list[dict], steps: int, global_batch: int) -> None:
    """Whatever the worker count, a replayed step trains the same global batch: per step, every
    attempt's keys together are that batch; over the epoch, each sample is in one step only."""
    batches: dict[int, set[str]] = {}
    for row in records:
        batches.setdefault(row["step"], set()).update(row["keys"])
    assert len(batches) == steps
    for step, keys in batches.items():
        assert len(keys) == global_batch, f"step {step}: the attempts trained {len(keys)} different samples"
    counts = Counter(key for keys in batches.values() for key in keys)
    assert max(counts.values()) == 1 and len(counts) == steps * global_batch
