"""`pipeline sweep`: a seeds x settings grid on Ray Tune, one MLflow parent run and a child per trial.

The end-to-end test runs the real command (a local Ray cluster it starts, a real sqlite MLflow
store, the digits data), kills it by SIGKILL once a trial has finished, and runs it again.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from pipeline.ops.sweep.results import aggregate, final_figures, metric_point, parent_metrics
from pipeline.ops.sweep.spec import build_spec, parse_grid, parse_seeds
from processes import kill_session
import train_hooks

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits-categorical.yaml"
EXPERIMENT = "sweep-digits"
FAILING = "model.latent.estimator=gumbel-softmax seed=1"  # its loss turns NaN at step 1 (tests/train_hooks.py): fails for good


# --- the definition, without Ray --------------------------------------------------------------------


def test_seeds_and_grid_parse():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3..5,0,3") == [3, 4, 5, 0]
    with pytest.raises(ConfigError):
        parse_seeds("a,b")
    assert parse_grid(["train.lr=1e-3,3e-3", "model.hidden=[128],[256, 128]"]) == [
        ("train.lr", ["1e-3", "3e-3"]), ("model.hidden", ["[128]", "[256, 128]"])]
    for bad in (["train.seed=1,2"], ["tracking.experiment=a,b"], ["train.lr"], ["train.lr=1,1"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_spec_keys_follow_what_is_trained(tmp_path):
    args = (str(DIGITS_CONFIG), [f"data.url={tmp_path}"], [0, 1],
            parse_grid(["model.latent.estimator=gumbel-softmax,straight-through"]))
    spec = build_spec(*args)
    assert [(t.point, t.seed) for t in spec.trials] == [
        ("model.latent.estimator=gumbel-softmax", 0), ("model.latent.estimator=gumbel-softmax", 1),
        ("model.latent.estimator=straight-through", 0), ("model.latent.estimator=straight-through", 1)]
    assert len({t.key for t in spec.trials}) == 4
    assert spec.trials[3].config.train.seed == 1 and spec.trials[3].config.model.latent.estimator == "straight-through"
    again = build_spec(*args, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")  # where it is logged: same sweep
    assert again.key == spec.key and [t.key for t in again.trials] == [t.key for t in spec.trials]
    assert build_spec(args[0], args[1], [0, 2], args[3]).key != spec.key
    assert build_spec(args[0], [*args[1], "train.epochs=2"], *args[2:]).trials[0].key != spec.trials[0].key
    with pytest.raises(ConfigError, match="train.workerz"):
        build_spec(args[0], args[1], [0], parse_grid(["train.workerz=1,2"]))


def test_aggregates_and_metric_names():
    from mlflow.utils.validation import _validate_metric_name

    assert aggregate([1.0, 2.0, 4.0]) == {"mean": statistics.mean([1.0, 2.0, 4.0]),
                                          "sd": statistics.stdev([1.0, 2.0, 4.0]), "n": 3.0}
    assert aggregate([5.0]) == {"mean": 5.0, "n": 1.0}  # no spread from one value
    assert final_figures({"val/loss": 1.0, "val/kl_latent_3": 0.1, "train/loss": 2.0, "test/nll_is_k10": 3.0,
                          "latent/perplexity": 7.0, "val/psnr": float("nan")}) == {
        "val/loss": 1.0, "test/nll_is_k10": 3.0, "latent/perplexity": 7.0}
    assignments = ("model.hidden=[256, 128]", "train.lr=0.001")
    assert metric_point(assignments) == "model.hidden-_256_ 128_ train.lr-0.001"
    assert metric_point(()) == "base"
    from pipeline.ops.sweep.results import TrialOutcome
    from pipeline.ops.sweep.spec import Trial

    trial = Trial(",".join(assignments), assignments, 0, "k", None)
    names = parent_metrics({trial.point: {"val/loss": aggregate([1.0, 2.0])}},
                           [TrialOutcome(trial, "finished", "r", False, metrics={"val/loss": 1.0})])
    for name in names:
        _validate_metric_name(name)  # MLflow takes every name the parent logs


def test_cli_refuses_a_bad_grid(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(DIGITS_CONFIG), "--seeds", "0",
                           "--grid", "train.seed=1,2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seeds" in proc.stderr


# --- end to end: real Ray, real MLflow ---------------------------------------------------------------



def _children(client: MlflowClient, parent_id: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def _wait_for_finished_trial(client: MlflowClient, proc: subprocess.Popen, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before it was killed:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
            finished = [r for r in runs if "sweep.trial_key" in r.data.tags]
            if finished:
                return finished
        time.sleep(0.5)
    raise TimeoutError("no trial finished")


@pytest.mark.timeout(900)
def test_sweep_killed_and_resumed(digits_dataset, tmp_path, tracking_uri):
    """2 seeds x 2 settings, 1 worker per trial, 2 trials at a time on the machine's 2 CPUs. One trial
    fails for good (NaN stop). The sweep is SIGKILLed as soon as one trial has finished, then run again
    with --evaluate: the finished trial is not trained again, the interrupted ones continue, every
    trial is evaluated on test once, and the parent holds mean, sd and n of each figure per setting,
    computed from the children's own values, without the failed trial but counting it."""
    uri = tracking_uri
    env = os.environ | train_hooks.env(train_hooks.nan_at(1, run_name=FAILING))  # the trials inherit it
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "pipeline", "sweep", str(DIGITS_CONFIG), "--seeds", "0,1",
               "--grid", "model.latent.estimator=gumbel-softmax,straight-through", "-o", f"data.url={digits_dataset}",
               "-o", "train.workers=1", "-o", "train.epochs=1", "-o", "model.hidden=[32]",
               "-o", f"train.storage={tmp_path / 'ray'}", "-o", f"tracking.experiment={EXPERIMENT}",
               "--tracking-uri", uri]
    client = MlflowClient(uri)

    started = time.perf_counter()
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        done_before = {r.info.run_id: r for r in _wait_for_finished_trial(client, first)}
    finally:
        kill_session(first.pid)
        first.wait(timeout=60)
    killed_s = time.perf_counter() - started
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([experiment_id], "tags.`sweep.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"  # killed: never ended
    parent_id = parents[0].info.run_id
    done_before = {i: client.get_run(i) for i in done_before}  # as they stood when the sweep died
    unfinished = [r for r in _children(client, parent_id) if r.info.status != "FINISHED"]

    resumed = time.perf_counter()
    second = subprocess.Popen([*command, "--evaluate", "-k", "10", "--json"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = second.communicate(timeout=600)
    finally:
        kill_session(second.pid)  # after a timeout: the driver and its Ray cluster
    resumed_s = time.perf_counter() - resumed
    assert second.returncode == 3, stderr[-4000:]  # some trials failed, some finished
    result = json.loads(stdout)
    assert result["parent_run_id"] == parent_id and result["attempt"] == 2
    assert (result["finished"], result["failed"]) == (3, 1), [(t["point"], t["seed"], t.get("reason"))
                                                             for t in result["trials"] if t["outcome"] != "finished"]
    by_name = {f"{t['point']} seed={t['seed']}": t for t in result["trials"]}
    assert by_name[FAILING]["outcome"] == "failed" and "non-finite" in by_name[FAILING]["reason"]
    assert sum(not t["reused"] for t in result["trials"]) >= 1, "the kill left nothing to resume"

    # Parent and children: one child per trial, each tagged with its parent and trial key.
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.attempts"] == "2" and parent.data.tags["sweep.trials.failed"] == "1"
    assert json.loads(parent.data.params["sweep.seeds"]) == [0, 1]
    assert json.loads(parent.data.params["sweep.grid.model.latent.estimator"]) == ["gumbel-softmax", "straight-through"]
    assert "model.latent.estimator" not in parent.data.params and "train.seed" not in parent.data.params
    artifacts = {a.path for a in client.list_artifacts(parent_id, "sweep")}
    assert {"sweep/definition.json", "sweep/aggregates.csv", "sweep/result.json"} <= artifacts
    children = _children(client, parent_id)
    assert len(children) == 4 and len({c.data.tags["sweep.trial_key"] for c in children}) == 4
    assert {c.info.run_id for c in children} == {t["run_id"] for t in result["trials"]}
    named = {c.info.run_name: c for c in children}
    assert named[FAILING].info.status == "FAILED" and named[FAILING].data.tags["sweep.outcome"] == "failed"

    # The trials finished before the kill were not trained again: same run, untouched history, no restart.
    for run_id, before in done_before.items():
        after = client.get_run(run_id)
        assert after.info.status == "FINISHED" and "restarts" not in after.data.tags
        assert after.info.end_time == before.info.end_time
        assert after.data.metrics["train/loss"] == before.data.metrics["train/loss"]
        assert by_name[after.info.run_name]["reused"]
    for run in unfinished:  # interrupted trials continued as the same run
        if run.info.run_name != FAILING:
            after = client.get_run(run.info.run_id)
            assert after.info.status == "FINISHED" and after.data.tags.get("restarts") == "1"
    for child in children:  # every metric history clean; test figures logged once, by the second attempt
        for key in client.get_run(child.info.run_id).data.metrics:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert len(steps) == len(set(steps)), (child.info.run_name, key)
        if child.info.run_name != FAILING:
            assert len(client.get_metric_history(child.info.run_id, "test/nll_is_k10")) == 1

    # Aggregates: exactly the children's own final values; the failed trial left out and counted.
    metrics = parent.data.metrics
    finished = [c for c in children if c.info.run_name != FAILING]
    for point in ("model.latent.estimator=gumbel-softmax", "model.latent.estimator=straight-through"):
        mine = [c for c in finished if c.data.tags["sweep.point"] == point]
        segment = metric_point((point,))
        assert metrics[f"sweep/{segment}/trials/finished"] == len(mine)
        assert metrics[f"sweep/{segment}/trials/failed"] == (1 if point in FAILING else 0)
        for figure in ("val/loss", "val/kl", "latent/perplexity", "test/loss", "test/nll_is_k10"):
            values = [client.get_run(c.info.run_id).data.metrics[figure] for c in mine]
            assert metrics[f"sweep/{segment}/{figure}/mean"] == statistics.mean(values)
            assert metrics[f"sweep/{segment}/{figure}/n"] == len(values)
            if len(values) > 1:
                assert metrics[f"sweep/{segment}/{figure}/sd"] == statistics.stdev(values)
            else:
                assert f"sweep/{segment}/{figure}/sd" not in metrics
    assert (metrics["sweep/trials/finished"], metrics["sweep/trials/failed"]) == (3, 1)

    # `pipeline compare` shows the parent and its trials.
    from pipeline.ops.compare import compare_rows

    rows = {r["run_id"]: r for r in compare_rows(uri, EXPERIMENT)}
    assert rows[parent_id]["sweep"] == "parent of 4 trials, 1 failed"
    assert rows[named[FAILING].info.run_id]["sweep"] == f"trial of {parent.info.run_name} (failed)"
    assert all(rows[c.info.run_id]["parent_run_id"] == parent_id for c in children)
    print(f"first attempt killed after {killed_s:.0f} s, resumed attempt {resumed_s:.0f} s")
