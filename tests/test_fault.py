"""Fault tolerance on a real local Ray cluster: killed workers, killed drivers, elastic
resumption, NaN policies. Real processes are killed by PID; nothing is mocked."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ops_services import free_port

from pipeline.config import load_config
from pipeline.data import load_mnist_splits, steps_per_epoch, write_shards
from pipeline.train.trainer import TrainingError, train
from processes import kill_session
from test_dvae_train import _final_checkpoint
import train_hooks

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits-categorical.yaml"


@pytest.fixture(scope="module")
def mnist_dataset(tmp_path_factory, mnist_dir) -> str:
    out = tmp_path_factory.mktemp("mnist")
    write_shards(load_mnist_splits(str(mnist_dir)), str(out), source="mnist", samples_per_shard=5000, progress=False)
    return str(out)


@pytest.fixture(autouse=True)
def sample_log(tmp_path, monkeypatch) -> Path:
    """Every rank appends the keys it trained on per step (a hook the driver passes on: tests/train_hooks.py)."""
    train_hooks.install(monkeypatch, train_hooks.sample_log(tmp_path / "samples"))
    return tmp_path / "samples"


def _config(dataset: str, uri: str, tmp_path: Path, *extra: str):
    return load_config(DIGITS_CONFIG, [f"data.url={dataset}", f"tracking.uri={uri}",
                                       f"train.storage={tmp_path / 'ray'}", *extra])



def _complete_rows(path: Path) -> list[dict]:
    """The log's finished lines: a worker may be mid-write when we read (or killed mid-write)."""
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def _records(sample_log: Path) -> list[dict]:
    rows = []
    for path in sorted(sample_log.glob("rank*.jsonl")):
        rows += _complete_rows(path)
    return rows


def _wait_for_step(sample_log: Path, rank: int, step: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    path = sample_log / f"rank{rank}.jsonl"
    while time.monotonic() < deadline:
        if path.exists():
            lines = _complete_rows(path)
            if lines and lines[-1]["step"] >= step:
                return lines[-1]
        time.sleep(0.02)
    raise TimeoutError(f"rank {rank} never reached step {step}")


def _assert_each_sample_trained_once(records: list[dict], epoch: int, steps: int, global_batch: int) -> tuple[int, int]:
    """Per (rank, step) every attempt trained the same keys; the epoch's steps cover each sample once."""
    by_step: dict[tuple[int, int], list[list[str]]] = defaultdict(list)
    for row in records:
        if row["epoch"] == epoch:
            by_step[(row["rank"], row["step"])].append(row["keys"])
    for attempts in by_step.values():
        assert all(keys == attempts[0] for keys in attempts), "a replayed step trained different samples"
    keys = [key for attempts in by_step.values() for key in attempts[0]]
    assert len({step for _, step in by_step}) == steps
    duplicates = len(keys) - len(set(keys))
    missing = steps * global_batch - len(set(keys))
    return duplicates, missing


def _assert_history_clean(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has duplicated steps"


def _wait_for_registered_checkpoint(storage: Path, step: int, timeout: float = 120) -> None:
    """Until Ray Train has registered the checkpoint of global step ``step`` (its checkpoint manager's
    snapshot in the run's storage names it the latest): a worker group restarted from then on continues
    from it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in storage.rglob("checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(path.read_text())["latest_checkpoint_result"]
            except (OSError, ValueError, KeyError):  # being written
                continue
            if latest and latest["metrics"].get("step") == step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"Ray Train never registered the checkpoint of step {step} under {storage}")


def _killed_mid_epoch(config, sample_log: Path, monkeypatch, *, stall_step: int,
                      checkpoint_step: int) -> tuple[str, dict]:
    """Train ``config`` with rank 1 stalled after global step ``stall_step`` (a hook); once Ray has registered
    the checkpoint of ``checkpoint_step``, SIGKILL that worker by the pid its sample log names. The run
    id and the victim's log line."""
    train_hooks.install(monkeypatch, train_hooks.sample_log(sample_log),
                        train_hooks.stall_once(stall_step, 1, sample_log.parent / "stalled"))
    result: dict = {}

    def run() -> None:
        try:
            result["run"] = train(config)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            result["error"] = err

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    victim = _wait_for_step(sample_log, rank=1, step=stall_step)
    _wait_for_registered_checkpoint(Path(config.train.storage), checkpoint_step)
    os.kill(victim["pid"], signal.SIGKILL)
    runner.join(timeout=500)
    assert "run" in result, f"training did not finish after the worker was killed: {result.get('error')!r}"
    return result["run"].run_id, victim


def _same(a, b, where: str = "") -> None:
    """``a`` and ``b`` equal exactly: nested dicts/lists, tensors by torch.equal, numbers by ==."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def _assert_resumed_exactly(uri: str, run_id: str, storage: Path, reference_uri: str, reference_id: str,
                            reference_storage: Path, steps: int, checkpoint_step: int, victim: dict,
                            records: list[dict]) -> None:
    """The killed run: one MLflow run, restarted once from the checkpoint of ``checkpoint_step``, ends
    where the uninterrupted reference run ends: online weights, EMA weights, optimizer state, and the
    logged schedules (learning rate, KL weight, temperature) and losses, all exactly."""
    client, reference = MlflowClient(uri), MlflowClient(reference_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "1"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    _assert_history_clean(client, run_id)
    pids = {rank: {r["pid"] for r in records if r["rank"] == rank} for rank in (0, 1)}
    assert {rank: len(found) for rank, found in pids.items()} == {0: 2, 1: 2}, pids  # both ranks replaced once
    assert victim["pid"] in pids[1]
    first_step = {pid: min(r["step"] for r in records if r["pid"] == pid) for pid in pids[0] | pids[1]}
    assert sorted(first_step.values()) == [1, 1, checkpoint_step + 1, checkpoint_step + 1]  # resumed from it

    state, expected = _final_checkpoint(storage), _final_checkpoint(reference_storage)
    assert state["step"] == expected["step"] == steps
    # `model` is the EMA (what the run logs and evaluates), `online_model` the weights the optimizer trains.
    for part in ("online_model", "model", "ema", "optimizer"):
        _same(state[part], expected[part], part)
    assert any(not torch.equal(tensor, expected["online_model"][name]) for name, tensor in expected["model"].items()
               if tensor.is_floating_point()), "EMA and online weights are alike: the test could not tell them apart"
    for key in ("train/lr", "train/kl_weight", "train/temperature", "train/loss", "val/loss"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history == {m.step: m.value for m in reference.get_metric_history(reference_id, key)}, key
    for key in ("train/lr", "train/kl_weight", "train/temperature"):  # the schedules moved across the kill
        values = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        assert len(set(values)) > 3, (key, values)


@pytest.mark.slow  # ~85 s (a killed run and its reference); the default run kills the grid dVAE's worker below
@pytest.mark.timeout(600)
def test_killed_worker_resumes_exactly(ray_cluster, digits_dataset, tmp_path, tracking_uri, monkeypatch):
    """A categorical VAE on digits with the weight EMA, a cosine learning rate after a warm-up, a KL weight
    warm-up and a cosine temperature: rank 1 killed (SIGKILL) mid-epoch after the checkpoint of step 10;
    the run resumes in the same MLflow run and ends exactly where an uninterrupted run of the same config
    ends, every sample trained once."""
    steps = steps_per_epoch(1297, 2, 32)  # 20, one epoch
    settings = ["train.epochs=1", "train.log_every=1", "train.checkpoint_every_steps=5", "train.ema=0.9",
                "train.lr_schedule=cosine", "train.lr_warmup_steps=4", "train.lr_min=1e-4", "train.kl_weight=2.0",
                "train.kl_warmup_steps=12", "model.latent.tau_schedule=cosine", "model.latent.tau_cosine.steps=16"]
    train_hooks.install(monkeypatch)  # the reference run: no hooks
    reference = train(_config(digits_dataset, tracking_uri, tmp_path / "reference", *settings,
                              "tracking.experiment=uninterrupted"))
    config = _config(digits_dataset, tracking_uri, tmp_path, *settings, "tracking.experiment=kill")
    run_id, victim = _killed_mid_epoch(config, tmp_path / "samples", monkeypatch, stall_step=13, checkpoint_step=10)
    records = _records(tmp_path / "samples")
    _assert_resumed_exactly(tracking_uri, run_id, tmp_path / "ray", tracking_uri, reference.run_id,
                            tmp_path / "reference" / "ray", steps, 10, victim, records)
    assert _assert_each_sample_trained_once(records, epoch=0, steps=steps, global_batch=64) == (0, 0)


@pytest.mark.timeout(600)
def test_killed_grid_dvae_worker_resumes_exactly(ray_cluster, grid_dvae_run, tmp_path, tracking_uri, monkeypatch):
    """The session's grid dVAE (configs/images-dvae.yaml at test widths: EMA, cosine learning rate with a
    warm-up, KL warm-up, cosine temperature, dead-code restarts, random crops and flips) trained again with
    the same config, rank 1 killed after step 7 of 8 (epoch 2, after the mid-epoch checkpoint of step 6):
    it ends exactly where the session's uninterrupted run ended."""
    from conftest import GRID_DVAE, GRID_DVAE_CONFIG, grid_dvae_overrides

    config = load_config(GRID_DVAE_CONFIG, grid_dvae_overrides(grid_dvae_run["dataset"], tracking_uri,
                                                               tmp_path / "ray"))
    steps = GRID_DVAE["images"] // GRID_DVAE["batch"] * GRID_DVAE["epochs"]
    assert (steps, config.train.checkpoint_every_steps) == (8, 3)
    run_id, victim = _killed_mid_epoch(config, tmp_path / "samples", monkeypatch, stall_step=7, checkpoint_step=6)
    records = _records(tmp_path / "samples")
    _assert_resumed_exactly(tracking_uri, run_id, tmp_path / "ray", grid_dvae_run["uri"], grid_dvae_run["run_id"],
                            grid_dvae_run["storage"], steps, 6, victim, records)
    for epoch in (0, 1):
        assert _assert_each_sample_trained_once(records, epoch, steps // 2, GRID_DVAE["batch"]) == (0, 0)


@pytest.mark.slow  # ~70 s each; the default run kills a worker mid-epoch in the two tests above
@pytest.mark.timeout(600)
@pytest.mark.parametrize("trial", [1, 2, 3, 4])
def test_killed_worker_at_a_random_step_trains_every_sample_once(ray_cluster, mnist_dataset, tmp_path, tracking_uri,
                                                                  trial, sample_log):
    """Kill rank 1 at a random step mid-epoch of MNIST: one run, clean history, every sample once."""
    config = _config(mnist_dataset, tracking_uri, tmp_path, "train.epochs=1", "train.batch_size=100",
                     "train.checkpoint_every_steps=40", "train.log_every=10", "model.hidden=[128]",
                     "model.binarize=threshold", "tracking.experiment=kill")
    steps = steps_per_epoch(50_000, 2, 50)
    kill_at = random.Random(trial).randrange(50, steps - 60)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", train(config)), daemon=True)
    runner.start()
    victim = _wait_for_step(sample_log, rank=1, step=kill_at)
    os.kill(victim["pid"], signal.SIGKILL)
    runner.join(timeout=500)
    assert "r" in result, "training did not finish after the worker was killed"
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
    assert [r.info.run_id for r in runs] == [result["r"].run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["restarts"] == "1"  # one kill, one restart of the worker group
    _assert_history_clean(client, runs[0].info.run_id)
    records = _records(sample_log)
    pids = {rank: {r["pid"] for r in records if r["rank"] == rank} for rank in (0, 1)}
    assert {rank: len(found) for rank, found in pids.items()} == {0: 2, 1: 2}, pids  # both ranks replaced once
    assert victim["pid"] in pids[1]
    duplicates, missing = _assert_each_sample_trained_once(records, epoch=0, steps=steps, global_batch=100)
    assert (duplicates, missing) == (0, 0)


class _StoreLock:
    """Holds an exclusive lock on the sqlite tracking store: for that long every MLflow write
    fails (after sqlite's busy timeout), as in an outage, while training goes on."""

    def __init__(self, uri: str) -> None:
        self.path = uri.removeprefix("sqlite:///")
        self.connection: sqlite3.Connection | None = None

    def hold(self) -> None:
        self.connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.connection.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.connection is not None:
            self.connection.execute("ROLLBACK")
            self.connection.close()
            self.connection = None


@pytest.mark.slow  # ~60 s; the default run kills a worker mid-epoch in test_killed_worker_resumes_exactly
@pytest.mark.timeout(600)
def test_killed_rank0_loses_no_metric_point(ray_cluster, digits_dataset, tmp_path, tracking_uri, sample_log):
    """Kill rank 0 just after an epoch-end checkpoint and just after a mid-epoch checkpoint, each
    time with the metrics of the checkpointed steps still undelivered (the store locked): every
    log step and every epoch's val/* is in the run exactly once."""
    epochs, steps = 4, steps_per_epoch(1297, 2, 32)  # 20 steps per epoch
    config = _config(digits_dataset, tracking_uri, tmp_path, f"train.epochs={epochs}", "train.log_every=5",
                     "train.checkpoint_every_steps=5", "train.max_failures=3", "tracking.experiment=kill-rank0")
    lock = _StoreLock(tracking_uri)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", train(config)), daemon=True)
    runner.start()
    try:
        # (locked from, killed after): the report after the checkpoint step has returned, so Ray
        # has registered that checkpoint (a report waits for the previous one to be consumed).
        for lock_at, checkpoint_step in ((steps - 3, steps), (2 * steps + 7, 2 * steps + 10)):
            _wait_for_step(sample_log, rank=0, step=lock_at)
            lock.hold()
            victim = _wait_for_step(sample_log, rank=0, step=checkpoint_step + 6)
            os.kill(victim["pid"], signal.SIGKILL)
            lock.release()
        runner.join(timeout=500)
    finally:
        lock.release()
    assert "r" in result, "training did not finish after rank 0 was killed"
    client = MlflowClient(tracking_uri)
    run = client.get_run(result["r"].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "2"
    assert len({r["pid"] for r in _records(sample_log) if r["rank"] == 0}) == 3
    _assert_history_clean(client, run.info.run_id)
    total = epochs * steps
    history = lambda key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))  # noqa: E731
    assert history("train/loss") == [1, *range(5, total + 1, 5)]
    for key in ("val/loss", "val/recon", "val/kl"):
        assert history(key) == list(range(steps, total + 1, steps)), key


@pytest.mark.slow  # ~45 s; per-partition noise and batches are checked without Ray in tests/test_stream.py
@pytest.mark.timeout(300)
def test_one_and_two_workers_see_the_same_global_batches(ray_cluster, digits_dataset, tmp_path, tracking_uri):
    losses = {}
    for workers in (1, 2):
        config = _config(digits_dataset, tracking_uri, tmp_path / str(workers), "train.epochs=1",
                         f"train.workers={workers}", "data.partitions=2", "train.log_every=1",
                         f"tracking.experiment=elastic{workers}")
        run_id = train(config).run_id
        history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
        losses[workers] = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses[1]) == len(losses[2]) == steps_per_epoch(1297, 2, 32)
    assert losses[1] == pytest.approx(losses[2], rel=1e-4)


@pytest.mark.slow  # ~130 s; the default run resumes runs of a killed driver through tests/test_sweep.py
@pytest.mark.timeout(600)
def test_killed_driver_resumes_the_same_run(mnist_dataset, tmp_path):
    """SIGKILL the whole `pipeline train` process group mid-epoch; `--resume` finishes the same run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sample_log = tmp_path / "samples"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri} | train_hooks.env(train_hooks.sample_log(sample_log))
    env.pop("RAY_ADDRESS", None)
    args = ["-o", f"data.url={mnist_dataset}", "-o", "train.epochs=2", "-o", "train.checkpoint_every_steps=50",
            "-o", f"train.storage={tmp_path / 'ray'}",
            "-o", "model.hidden=[128]", "-o", "train.batch_size=100", "-o", "tracking.experiment=driver-kill"]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(DIGITS_CONFIG), *args], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        _wait_for_step(sample_log, rank=0, step=180)
    finally:
        left = kill_session(driver.pid)  # the driver and the local Ray cluster it started
        driver.wait(timeout=60)
    assert left == []
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("driver-kill").experiment_id])[0].info.run_id
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "train", "--resume", run_id], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run_id: {run_id}" in resumed.stdout
    assert "Traceback" not in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]  # no teardown noise
    runs = client.search_runs([client.get_experiment_by_name("driver-kill").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert int(runs[0].data.tags["restarts"]) == 1
    _assert_history_clean(client, run_id)
    records = _records(sample_log)
    steps = steps_per_epoch(50_000, 2, 50)
    assert max(r["step"] for r in records) == 2 * steps
    for epoch in (0, 1):
        assert _assert_each_sample_trained_once(records, epoch, steps, 100) == (0, 0)


@pytest.mark.timeout(300)
def test_nonfinite_skip_batch_continues_and_counts(ray_cluster, digits_dataset, tmp_path, tracking_uri, monkeypatch):
    train_hooks.install(monkeypatch, train_hooks.nan_at(5))
    config = _config(digits_dataset, tracking_uri, tmp_path, "train.epochs=1", "train.on_nonfinite=skip_batch",
                     "train.log_every=1")
    result = train(config)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["nonfinite.last_step"] == "5"
    assert [(m.step, m.value) for m in client.get_metric_history(result.run_id, "train/nonfinite_skipped")] == [(6, 1.0)]
    assert result.steps == steps_per_epoch(1297, 2, 32)


@pytest.mark.slow  # ~25 s; the default run stops on a NaN loss in tests/test_train.py
@pytest.mark.timeout(300)
def test_nonfinite_stop_names_the_step(ray_cluster, digits_dataset, tmp_path, tracking_uri, monkeypatch):
    train_hooks.install(monkeypatch, train_hooks.nan_at(7))
    config = _config(digits_dataset, tracking_uri, tmp_path, "train.epochs=1")
    with pytest.raises(TrainingError, match="non-finite loss at step 7"):
        train(config)
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("digits-categorical").experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags["failure.step"] == "7"


def _start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    import urllib.request

    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    kill_session(server.pid)
    raise TimeoutError("mlflow server did not become healthy")


@pytest.mark.slow  # ~140 s; the default run keeps test_run_logger's real server-down test (rows delivered once it is up)
@pytest.mark.timeout(600)
def test_mlflow_server_outage_loses_no_metrics(ray_cluster, digits_dataset, tmp_path, sample_log):
    """Stop the real tracking server mid-run and start it again: the history is complete."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow_server(tmp_path, port)
    config = _config(digits_dataset, uri, tmp_path, "train.epochs=12", "train.log_every=5",
                     "tracking.experiment=outage")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", train(config)), daemon=True)
    runner.start()
    servers = [server]
    try:
        outage_step = _wait_for_step(sample_log, rank=0, step=100)["step"]
        kill_session(server.pid)  # the server is gone: rank 0 must keep training and keep the metrics
        time.sleep(5)
        servers.append(_start_mlflow_server(tmp_path, port))  # back ~20 s later, maybe after training ended
        runner.join(timeout=400)
        _check_outage_run(result, uri, outage_step)
    finally:
        for each in servers:
            kill_session(each.pid)


def _check_outage_run(result: dict, uri: str, outage_step: int) -> None:
    assert "r" in result, "training did not finish"
    client = MlflowClient(uri)
    run_id = result["r"].run_id
    steps_per = steps_per_epoch(1297, 2, 32)
    total = 12 * steps_per
    assert result["r"].steps == total > outage_step
    assert result["r"].delivery["late_batches"] >= 1  # the outage was hit: rank 0 delivered late, lost nothing
    expected = sorted({1} | set(range(5, total + 1, 5)))
    assert [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)] == expected
    assert len(client.get_metric_history(run_id, "val/loss")) == 12
    assert client.get_run(run_id).info.status == "FINISHED"
