"""Rank 0's MLflow logger on real stores: a real `mlflow server` that is down, a sqlite store, a
logger process SIGKILLed with rows undelivered; `pipeline replay-metrics` on a real fallback file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ops_services import free_port, running, spawn_mlflow_server
from pipeline.cli import app
from pipeline.runs.logger import PENDING_FILE, RunLogger, load_pending


def _new_run(uri: str) -> str:
    client = MlflowClient(uri)
    return client.create_run(client.create_experiment("logger")).info.run_id


def _steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_tags_restarts_and_metrics_never_wait_for_a_server_that_is_down(tmp_path):
    """Every tag point of the loop (start, restart count, NaN stop, data health) while the tracking
    server is down: nothing raises or blocks; all of it arrives once the server is up."""
    store = tmp_path / "server"
    store.mkdir()
    run_id = _new_run(f"sqlite:///{store / 'mlflow.db'}")  # the run the (later) server serves
    MlflowClient(f"sqlite:///{store / 'mlflow.db'}").log_metric(run_id, "train/loss", 9.0, step=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"  # nothing listens yet: the server is down
    logger = RunLogger(url, run_id, resumed=True, max_backoff_s=1.0)  # a restarted rank 0

    def training() -> None:  # the loop's calls, made while nothing listens at url
        logger.set_tags({"cluster.nodes": 1, "cluster.node_ids": "n0"})
        logger.count_restart("worker group restarted at step 1")
        logger.log_metrics({"train/loss": 1.0}, step=1)  # the run has step 1: not sent again
        logger.log_metrics({"train/loss": 2.0}, step=5)
        logger.set_tags({"data.skipped_shards": "s3://b/000.tar", "failure": "non-finite loss at step 7"})

    # The server only starts further down: calls that waited for it would never return.
    caller = threading.Thread(target=training, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "training waited on MLflow"
    assert len(logger.pending()) == 7  # appended, none delivered: 4 tags, 1 restart, 2 metric rows
    deadline = time.monotonic() + 60
    while logger.failed_attempts < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logger.failed_attempts >= 2  # the outage was hit, not missed
    with running(spawn_mlflow_server(store, port), timeout_s=300):
        report = logger.close(timeout_s=120)
        tags = MlflowClient(url).get_run(run_id).data.tags
        assert report["late_batches"] >= 1 and "fallback_file" not in report
        assert (tags["cluster.nodes"], tags["restarts"], tags["data.skipped_shards"]) == ("1", "1", "s3://b/000.tar")
        assert tags["last_restart"] == "worker group restarted at step 1" and tags["failure"].startswith("non-finite")
        assert _steps(url, run_id, "train/loss") == [(1, 9.0), (5, 2.0)]


KILLED_LOGGER = textwrap.dedent("""
    import sys, time
    from pipeline.runs.logger import RunLogger
    uri, run_id, folder = sys.argv[1:]
    logger = RunLogger(uri, run_id, min_interval_s=600)  # the first write goes out, then none for 10 min
    logger.log_metrics({"train/loss": 1.0}, step=1)
    while logger.pending():
        time.sleep(0.05)
    logger.log_metrics({"train/loss": 2.0, "val/loss": 3.0}, step=2)
    logger.set_tags({"nonfinite.last_step": 2})
    logger.save_pending(folder)  # as rank 0 does before every checkpoint report
    print("saved", flush=True)
    time.sleep(600)
""")


def test_rows_saved_with_a_checkpoint_survive_a_killed_logger(tmp_path):
    """Rank 0 SIGKILLed with step 2 undelivered: the checkpoint's rows reach the run, once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _new_run(uri)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_LOGGER, uri, run_id, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _steps(uri, run_id, "train/loss") == [(1, 1.0)]  # step 2 died with the process
    pending = load_pending(tmp_path)
    assert {row.get("key") or row.get("tag") for row in pending} == {"train/loss", "val/loss", "nonfinite.last_step"}
    # the restored rank 0: the checkpoint's rows first (a row the run holds is not sent twice), then new steps
    logger = RunLogger(uri, run_id, resumed=True, pending=[{"key": "train/loss", "value": 1.0, "timestamp": 0,
                                                              "step": 1}, *pending])
    logger.log_metrics({"train/loss": 4.0}, step=3)
    assert logger.close() == {"late_batches": 0, "failed_attempts": 0}
    assert _steps(uri, run_id, "train/loss") == [(1, 1.0), (2, 2.0), (3, 4.0)]
    assert _steps(uri, run_id, "val/loss") == [(2, 3.0)]
    assert MlflowClient(uri).get_run(run_id).data.tags["nonfinite.last_step"] == "2"


def test_replay_metrics_delivers_a_fallback_file_once(tmp_path):
    """MLflow unreachable until the end: `close` writes the fallback file; `pipeline replay-metrics`
    delivers its metrics, tags and restart count; a second replay adds nothing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _new_run(uri)
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    logger = RunLogger(unreachable, run_id, fallback_dir=str(tmp_path / "pending"), max_backoff_s=0.5)
    logger.count_restart("worker group restarted at step 10")
    for step in (10, 20):
        logger.log_metrics({"train/loss": float(step), "perf/samples_per_s": 100.0}, step=step)
    logger.set_tags({"cluster.nodes": 2})
    report = logger.close(timeout_s=1.0)
    fallback = Path(report["fallback_file"])
    rows = [json.loads(line) for line in fallback.read_text().splitlines()]
    assert len(rows) == 6 and {row["run_id"] for row in rows} == {run_id}
    assert not (tmp_path / PENDING_FILE).exists()
    for _ in range(2):  # the second replay finds every step and the restart already in the run
        result = CliRunner().invoke(app, ["replay-metrics", str(fallback), "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
        assert "delivered 6" in result.output
    assert _steps(uri, run_id, "train/loss") == [(10, 10.0), (20, 20.0)]
    assert len(_steps(uri, run_id, "perf/samples_per_s")) == 2
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["cluster.nodes"] == "2" and tags["restarts"] == "1"
    assert tags["last_restart"] == "worker group restarted at step 10"


def test_images_at_their_steps_and_a_restored_rank_0_logs_none_twice(tmp_path):
    """Per-epoch images (reconstruction grids, code-use plots) go through the same rows: at their
    steps in MLflow's image store; pending image rows a restored rank 0 delivers again are not duplicated."""
    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _new_run(uri)

    def logged() -> list[str]:
        return sorted(a.path for a in MlflowClient(uri).list_artifacts(run_id, "images") if a.path.endswith(".png"))

    # The sender writes at most once per min_interval_s: after its first write (a metric, seen in the
    # run) it holds whatever comes next for 60 s, so both images are surely pending when the
    # checkpoint's snapshot is taken; close() then ends the pause and delivers them.
    logger = RunLogger(uri, run_id, min_interval_s=60.0)
    logger.log_metrics({"train/loss": 1.0}, step=10)
    deadline = time.monotonic() + 30
    while not _steps(uri, run_id, "train/loss") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _steps(uri, run_id, "train/loss") == [(10, 1.0)]
    logger.log_image("reconstructions", Image.new("RGB", (8, 4), (200, 10, 10)), step=10)
    logger.log_image("reconstructions", Image.new("RGB", (8, 4), (10, 200, 10)), step=20)
    pending = logger.pending()
    assert [(row["image"], row["step"]) for row in pending] == [("reconstructions", 10), ("reconstructions", 20)]
    assert logged() == []
    logger.close()
    assert len(logged()) == 2  # delivered by the first rank 0 after the snapshot: the restored one resends both
    # a rank 0 restored from a checkpoint saved while both images were still pending
    RunLogger(uri, run_id, resumed=True, pending=pending, min_interval_s=0.0).close()

    names = logged()
    assert [int(name.split("+step+")[1].split("+")[0]) for name in names] == [10, 20]
    image = Image.open(MlflowClient(uri).download_artifacts(run_id, names[1], str(tmp_path)))
    assert image.size == (8, 4) and image.getpixel((0, 0)) == (10, 200, 10)
