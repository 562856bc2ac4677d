"""Champion/challenger on a real sqlite MLflow store with real logged models; `pipeline compare`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ops_runs import make_run, tiny_config
from pipeline.cli import app
from pipeline.models import build_vae
from pipeline.ops import registry
from pipeline.ops.retrain import prepare_run
from pipeline.ops.warmstart import WarmStartError, load_initial_weights
from pipeline.ops import tracking
from pipeline.train.tracking import get_run

EXPERIMENT = "ops-registry"


def cli(*args: str, env: dict | None = None):
    """The real `pipeline` command, in-process (a subprocess costs ~10 s of imports on a loaded machine)."""
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Three runs on the same data (first 100, then better 90, then worse 95) and one on other data."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    runs = {
        "first": make_run(uri, EXPERIMENT, "digits-cat2x3-first", val_loss=100.0, seed=1,
                          test_metrics={"test/loss": 101.0, "test/nll_is_k100": 97.5}),
        "better": make_run(uri, EXPERIMENT, "digits-cat2x3-better", val_loss=90.0, seed=2, trigger="cron"),
        "worse": make_run(uri, EXPERIMENT, "digits-cat2x3-worse", val_loss=95.0, seed=3, trigger="new-data"),
        "other_data": make_run(uri, EXPERIMENT, "digits-cat2x3-otherdata", val_loss=10.0, digest="b" * 64, seed=4),
    }
    decisions = {key: registry.register_and_decide(uri, run_id, EXPERIMENT) for key, run_id in runs.items()}
    return {"uri": uri, "runs": runs, "decisions": decisions}


def test_first_run_becomes_champion(store):
    first = store["decisions"]["first"]
    assert (first.decision, first.promoted, first.version) == ("first", True, "1")


def test_better_challenger_takes_champion_and_worse_does_not(store):
    uri, runs, decisions = store["uri"], store["runs"], store["decisions"]
    better, worse = decisions["better"], decisions["worse"]
    assert better.promoted and better.decision == "promoted"
    assert (better.challenger_val_loss, better.champion_val_loss) == (90.0, 100.0)
    assert not worse.promoted and worse.decision == "kept"
    assert (worse.challenger_val_loss, worse.champion_val_loss, worse.champion_version) == (95.0, 90.0, "2")
    # the alias still points at the better run (other_data was not comparable), and the figures are on the runs
    assert registry.champion_run_id(uri, EXPERIMENT) == runs["better"]
    tags = get_run(uri, runs["worse"]).data.tags
    assert tags["champion.decision"] == "kept"
    assert float(tags["champion.challenger_val_loss"]) == 95.0 and float(tags["champion.incumbent_val_loss"]) == 90.0
    assert tags["registry.version"] == "3"


def test_other_validation_data_is_never_compared(store):
    other = store["decisions"]["other_data"]
    assert not other.promoted and other.decision == "not-comparable"
    assert "dataset.manifest_sha256" in other.reason


def test_promote_by_hand(store):
    uri, runs = store["uri"], store["runs"]
    env = {"MLFLOW_TRACKING_URI": uri}
    kept = cli("promote", runs["worse"], env=env)
    assert kept.exit_code == 3, kept.output  # the rule applies: not better, not promoted
    assert json.loads(kept.stdout)["version"] == "3"  # the run's existing version, not a new one
    forced = cli("promote", runs["first"], "--force", env=env)
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["decision"] == "forced"
    assert registry.champion_run_id(uri, EXPERIMENT) == runs["first"]
    back = cli("promote", runs["better"], "--force", env=env)
    assert back.exit_code == 0 and registry.champion_run_id(uri, EXPERIMENT) == runs["better"]


def test_compare_json_lists_every_run_sorted_by_val_loss(store):
    uri, runs = store["uri"], store["runs"]
    proc = cli("compare", "--json", "--experiment", EXPERIMENT, "--tracking-uri", uri)
    assert proc.exit_code == 0, proc.output
    rows = json.loads(proc.stdout)
    assert [r["val_loss"] for r in rows] == [10.0, 90.0, 95.0, 100.0]
    by_id = {r["run_id"]: r for r in rows}
    assert set(by_id) == set(runs.values())
    for row in rows:
        assert {"name", "latent_kind", "latent_size", "epochs", "val_loss", "test_loss", "test_nll_is",
                "samples_per_s", "duration_s", "trigger", "status", "champion"} <= set(row)
        assert (row["latent_kind"], row["latent_size"], row["status"]) == ("categorical", "2x3", "FINISHED")
        assert row["epochs"] == 10 and row["duration_s"] is not None and row["samples_per_s"] >= 1000
    first = by_id[runs["first"]]
    assert (first["test_loss"], first["test_nll_is"]) == (101.0, {"k100": 97.5})
    assert [r["name"] for r in rows if r["champion"]] == ["digits-cat2x3-better"]
    assert by_id[runs["better"]]["trigger"] == "cron" and by_id[runs["worse"]]["trigger"] == "new-data"
    table = cli("compare", "--tracking-uri", uri)  # no --experiment: the latest run's
    assert table.exit_code == 0 and "digits-cat2x3-better" in table.stdout and "★" in table.stdout


def test_warm_start_resolves_the_champion_and_loads_its_weights(store):
    uri = store["uri"]
    config = tiny_config(EXPERIMENT, "warm", **{"tracking.uri": uri})
    config.tracking.run_name = None
    prepared = prepare_run(config, warm_start=True)
    champion = tracking.model_version_by_alias(uri, EXPERIMENT, "champion")
    assert prepared.train.init_from == f"models:/{EXPERIMENT}/{champion.version}"
    assert prepared.tracking.run_name.startswith("digits-cat2x3-")  # <dataset>-<latent>-<time>
    model = build_vae(prepared.model, 64)
    load_initial_weights(model, prepared.train.init_from, uri)
    logged = tracking.load_pytorch_model(uri, prepared.train.init_from).vae
    for key, value in logged.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    other = build_vae(tiny_config(EXPERIMENT, "x", **{"model.hidden": "[16]"}).model, 64)
    with pytest.raises(WarmStartError, match="architecture differs"):
        load_initial_weights(other, prepared.train.init_from, uri)
    # a config with another architecture does not warm-start from an incompatible champion
    changed = prepare_run(tiny_config(EXPERIMENT, "y", **{"tracking.uri": uri, "model.hidden": "[16]"}), warm_start=True)
    assert changed.train.init_from is None


@pytest.mark.timeout(600)
def test_real_runs_on_shared_validation_shards_compare_and_a_registry_failure_shows(
        ray_cluster, digits_dataset, tmp_path, tracking_uri, capsys):
    """Two trained runs: the same validation shards, other training shards. They are compared on
    `dataset.val_sha256` (not refused as other data); a registry that refuses the model leaves
    a warning and a tag, and the run stays FINISHED."""
    from dataclasses import replace

    from pipeline.config import load_config
    from pipeline.data import load_digits_splits, read_manifest, write_shards
    from pipeline.ops.retrain import after_training
    from pipeline.train.trainer import train

    splits = load_digits_splits()
    fewer = tmp_path / "digits-fewer"  # 1000 of the 1297 training samples; val and test as before
    splits["train"] = replace(splits["train"], images=splits["train"].images[:1000], labels=splits["train"].labels[:1000])
    write_shards(splits, str(fewer), source="sklearn digits, fewer", samples_per_shard=500, progress=False)
    first, second = read_manifest(digits_dataset), read_manifest(str(fewer))
    assert first.digest() != second.digest() and registry.val_data_id(first) == registry.val_data_id(second)

    results, decisions = [], []
    for name, data in (("all", digits_dataset), ("fewer", str(fewer))):
        config = load_config("configs/digits-categorical.yaml", [
            f"data.url={data}", f"tracking.uri={tracking_uri}", f"train.storage={tmp_path / 'ray'}",
            "train.epochs=1", "tracking.experiment=shared-val", f"tracking.run_name={name}"])
        results.append(train(config))
        decisions.append(after_training(config, results[-1]))
    assert decisions[0].decision == "first"
    # compared, not "not-comparable": the outcome is the one the two runs' final val/loss make
    losses = [get_run(tracking_uri, r.run_id).data.metrics["val/loss"] for r in results]
    assert losses[0] != losses[1] and losses == [r.val_loss for r in results]
    expected = "promoted" if losses[1] < losses[0] else "kept"
    assert decisions[1].decision == expected, (losses, decisions[1].reason)
    assert (decisions[1].challenger_val_loss, decisions[1].champion_val_loss) == (losses[1], losses[0])
    assert decisions[1].champion_run_id == results[0].run_id
    winner = results[1] if expected == "promoted" else results[0]
    assert registry.champion_run_id(tracking_uri, "shared-val") == winner.run_id

    refused = config.model_copy(deep=True)
    refused.tracking.registered_model = "team/digits"  # MLflow refuses '/' in a model name
    assert after_training(refused, results[1]) is None
    run = get_run(tracking_uri, results[1].run_id)
    assert run.data.tags.get("champion.decision") == "registry-failed" and "team/digits" in run.data.tags["champion.reason"]
    assert "warning: model registry step failed, champion unchanged" in capsys.readouterr().err
    assert run.info.status == "FINISHED"
