"""`pipeline submit`, `jobs` and `schedule` against a real Ray head (Jobs API) and a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ops_services import running, spawn_mlflow_server, spawn_ray_head

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits-categorical.yaml"
EXPERIMENT = "ops-cluster"
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    with running(spawn_mlflow_server(root / "mlflow"), spawn_ray_head(root / "head")) as (tracking, address):
        yield {"address": address, "tracking": tracking}
        _stop_all_jobs(address)


def _stop_all_jobs(address: str) -> None:
    from pipeline.ops.ray_jobs import TERMINAL, connect

    client = connect(address)
    for job in client.list_jobs():
        if str(job.status) not in TERMINAL:
            client.stop_job(job.submission_id)


def pipeline(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def env(services) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return env | {"MLFLOW_TRACKING_URI": services["tracking"], "RAY_ADDRESS": services["address"]}


def _overrides(digits_dataset: str, tmp_path: Path, *extra: str) -> list[str]:
    args = [f"data.url={digits_dataset}", "train.epochs=1", f"train.storage={tmp_path / 'ray'}",
            f"tracking.experiment={EXPERIMENT}", *extra]
    return [part for a in args for part in ("-o", a)]


def test_failing_job_makes_follow_exit_nonzero(env, tmp_path):
    proc = pipeline("submit", CONFIG, *_overrides(str(tmp_path / "no-such-data"), tmp_path), "--follow", env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED" in proc.stderr and "no-such-data" in proc.stdout


def test_submit_follow_trains_and_tracks(env, services, digits_dataset, tmp_path):
    proc = pipeline("submit", CONFIG, *_overrides(digits_dataset, tmp_path), "--name", "digits-submitted", "--follow",
                    env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("job_id:"))
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("run_id:"))
    assert f"job {job_id}: SUCCEEDED; MLflow run {run_id}" in " ".join(proc.stderr.split())
    for secret_free in ("MLFLOW_TRACKING_URI",):  # names are shown, values never
        assert secret_free in proc.stderr and services["tracking"] not in proc.stderr

    run = MlflowClient(services["tracking"]).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-submitted"
    assert {"train/loss", "val/loss", "perf/samples_per_s"} <= set(run.data.metrics)
    tags = run.data.tags
    assert tags["trigger"] == "manual" and tags["ray.submission_id"] == job_id
    assert tags["champion.decision"] == "first" and tags["registry.version"] == "1"

    logs = pipeline("jobs", "logs", job_id, env=env, timeout=60)
    assert f"run_id: {run_id}" in logs.stdout
    listed = json.loads(pipeline("jobs", "list", "--json", env=env, timeout=60).stdout)
    assert {"submission_id": job_id, "status": "SUCCEEDED"}.items() <= {
        k: v for r in listed if r["submission_id"] == job_id for k, v in r.items()}.items()
    rows = json.loads(pipeline("compare", "--json", "--experiment", EXPERIMENT, env=env, timeout=60).stdout)
    assert [(r["name"], r["champion"], r["trigger"]) for r in rows] == [("digits-submitted", True, "manual")]


def test_scheduler_submits_one_job_per_cron_tick(env, services, digits_dataset, tmp_path):
    state = tmp_path / "schedule.json"
    proc = pipeline("schedule", CONFIG, "--cron", "* * * * * */4", "--max-triggers", "2", "--poll-seconds", "0.5",
                    "--state", str(state), "--cold-start", *_overrides(digits_dataset, tmp_path), env=env, timeout=120)
    try:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        history = json.loads(state.read_text())["history"]
        assert [h["trigger"] for h in history] == ["cron", "cron"]
        ticks = [datetime.fromisoformat(h["tick"]) for h in history]
        assert (ticks[1] - ticks[0]).total_seconds() % 4 == 0 and ticks[1] > ticks[0]
        assert all(t.second % 4 == 0 and t.tzinfo == timezone.utc for t in ticks)
        listed = {r["submission_id"]: r for r in json.loads(pipeline("jobs", "list", "--json", env=env, timeout=60).stdout)}
        for entry in history:
            job = listed[entry["job_id"]]
            assert job["metadata"]["pipeline.trigger"] == "cron" and "--trigger cron" in job["entrypoint"]
        stop = pipeline("jobs", "stop", history[0]["job_id"], env=env, timeout=60)
        assert stop.returncode == 0 and "stop requested" in stop.stderr
    finally:
        _stop_all_jobs(services["address"])  # the scheduled jobs need not train to the end


def test_resubmitting_the_same_tick_is_refused_by_ray(services, digits_dataset, tmp_path):
    """The idempotency key holds on the real cluster: a second submission of a tick returns the first job."""
    from pipeline.ops.ray_jobs import connect, list_jobs
    from pipeline.ops.schedule import TriggerEvent, job_trigger
    from pipeline.ops.submit import JobRequest

    client = connect(services["address"])
    request = JobRequest(config=str(REPO / CONFIG), tracking_uri=services["tracking"],
                         overrides=[o for o in _overrides(digits_dataset, tmp_path) if o != "-o"])
    fire = job_trigger(client, request)
    event = TriggerEvent("cron", datetime.now(timezone.utc), None, None, "ops-cluster-cron-idempotency")
    try:
        assert fire(event) == fire(event) == "ops-cluster-cron-idempotency"
        assert [r.submission_id for r in list_jobs(client)].count("ops-cluster-cron-idempotency") == 1
    finally:
        client.stop_job("ops-cluster-cron-idempotency")


def test_missing_token_is_a_clear_error(env, tmp_path):
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    proc = pipeline("jobs", "list", env=bare, timeout=60)
    assert proc.returncode == 1
    assert "requires a token" in " ".join(proc.stderr.split()) and "RAY_AUTH_TOKEN" in proc.stderr
