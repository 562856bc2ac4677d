"""Champion/challenger on a real sqlite MLflow store with real logged models; `pipeline compare`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import new_store
from ops_runs import make_run, tiny_config
from pipeline.cli import app
from pipeline.models import build_vae
from pipeline.ops import champion
from pipeline.ops.retrain import prepare_run
from pipeline.runs import registry
from pipeline.runs.load import WarmStartError, load_initial_weights, load_model
from pipeline.runs.store import get_run

EXPERIMENT = "ops-registry"


def cli(*args: str, env: dict | None = None):
    """The real `pipeline` command, in-process (a subprocess costs ~10 s of imports on a loaded machine)."""
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def store(empty_mlflow_db, tmp_path_factory) -> dict:
    """Three runs on the same data (first 100, then better 90, then worse 95) and one on other data."""
    uri = new_store(empty_mlflow_db, tmp_path_factory.mktemp("registry") / "mlflow.db")
    runs = {
        "first": make_run(uri, EXPERIMENT, "digits-cat2x3-first", val_loss=100.0, val_loss_onehot=100.0, seed=1,
                          test_metrics={"test/loss": 101.0, "test/nll_is_k100": 97.5}),
        "better": make_run(uri, EXPERIMENT, "digits-cat2x3-better", val_loss=90.0, val_loss_onehot=90.0, seed=2,
                           trigger="cron"),
        "worse": make_run(uri, EXPERIMENT, "digits-cat2x3-worse", val_loss=95.0, val_loss_onehot=95.0, seed=3,
                          trigger="new-data"),
        "other_data": make_run(uri, EXPERIMENT, "digits-cat2x3-otherdata", val_loss=10.0, val_loss_onehot=10.0,
                               digest="b" * 64, seed=4),
    }
    decisions = {key: champion.register_and_decide(uri, run_id, EXPERIMENT) for key, run_id in runs.items()}
    return {"uri": uri, "runs": runs, "decisions": decisions}


def test_first_run_becomes_champion(store):
    first = store["decisions"]["first"]
    assert (first.decision, first.promoted, first.version) == ("first", True, "1")


def test_better_challenger_takes_champion_and_worse_does_not(store):
    uri, runs, decisions = store["uri"], store["runs"], store["decisions"]
    better, worse = decisions["better"], decisions["worse"]
    assert better.promoted and better.decision == "promoted"
    assert (better.metric, better.challenger_value, better.champion_value) == ("val/loss_onehot", 90.0, 100.0)
    assert not worse.promoted and worse.decision == "kept"
    assert (worse.challenger_value, worse.champion_value, worse.champion_version) == (95.0, 90.0, "2")
    # the alias still points at the better run (other_data was not comparable), and the figures are on the runs
    assert registry.champion_run_id(uri, EXPERIMENT) == runs["better"]
    tags = get_run(uri, runs["worse"]).data.tags
    assert tags["champion.decision"] == "kept"
    assert float(tags["champion.challenger_value"]) == 95.0 and float(tags["champion.incumbent_value"]) == 90.0
    assert tags["champion.metric"] == "val/loss_onehot"
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
    incumbent = registry.model_version_by_alias(uri, EXPERIMENT, "champion")
    assert prepared.train.init_from == f"models:/{EXPERIMENT}/{incumbent.version}"
    assert prepared.tracking.run_name.startswith("digits-cat2x3-")  # <dataset>-<latent>-<time>
    model = build_vae(prepared.model, 64)
    load_initial_weights(model, prepared.train.init_from, uri)
    logged = load_model(prepared.train.init_from, tracking_uri=uri).vae
    for key, value in logged.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    other = build_vae(tiny_config(EXPERIMENT, "x", **{"model.hidden": "[16]"}).model, 64)
    with pytest.raises(WarmStartError, match="architecture differs"):
        load_initial_weights(other, prepared.train.init_from, uri)
    # a config with another architecture does not warm-start from an incompatible champion
    changed = prepare_run(tiny_config(EXPERIMENT, "y", **{"tracking.uri": uri, "model.hidden": "[16]"}), warm_start=True)
    assert changed.train.init_from is None


FAIR = "ops-registry-fair"


@pytest.fixture(scope="module")
def fair(store) -> dict:
    """One model's runs, decided in this order: a straight-through champion (one-hot -ELBO 103); a
    Gumbel-Softmax run whose relaxed val/loss (95) is lower but whose one-hot -ELBO (110) is not; a run
    with another likelihood and one with another binarization, both with far lower figures; a
    Gumbel-Softmax run whose relaxed val/loss (104) is higher but whose one-hot -ELBO (101) is lower;
    a categorical run without a one-hot figure. (In the store's own experiment, so used after
    `compare`'s test, which reads the store's latest run.)"""
    uri = store["uri"]
    hard, relaxed = {"model.latent.estimator": "straight-through"}, {"model.latent.estimator": "gumbel-softmax"}
    runs = {
        "straight_through": make_run(uri, FAIR, "st", val_loss=103.0, val_loss_onehot=103.0, overrides=hard, seed=5),
        "relaxed_worse": make_run(uri, FAIR, "gs-worse", val_loss=95.0, val_loss_onehot=110.0, overrides=relaxed,
                                  seed=6),
        "other_likelihood": make_run(uri, FAIR, "logistic", val_loss=50.0, val_loss_onehot=50.0, seed=7,
                                     overrides={**hard, "model.likelihood": "logistic", "model.binarize": "none"}),
        "other_binarization": make_run(uri, FAIR, "threshold", val_loss=50.0, val_loss_onehot=50.0, seed=10,
                                       overrides={**hard, "model.binarize": "threshold"}),
        "relaxed_better": make_run(uri, FAIR, "gs-better", val_loss=104.0, val_loss_onehot=101.0, overrides=relaxed,
                                   seed=8),
        "no_onehot": make_run(uri, FAIR, "gs-unmeasured", val_loss=1.0, overrides=relaxed, seed=9),
    }
    decisions = {key: champion.register_and_decide(uri, run_id, FAIR) for key, run_id in runs.items()}
    return {"uri": uri, "runs": runs, "decisions": decisions}


def test_estimators_compare_on_the_one_hot_elbo_not_their_own_val_loss(fair):
    uri, runs, decisions = fair["uri"], fair["runs"], fair["decisions"]
    assert decisions["straight_through"].decision == "first"
    assert [decisions[k].decision for k in ("relaxed_worse", "relaxed_better")] == ["kept", "promoted"]
    assert {d.metric for d in decisions.values()} == {"val/loss_onehot"}
    worse = decisions["relaxed_worse"]  # relaxed 95 < 103, but one-hot 110 > 103
    assert (worse.decision, worse.challenger_value, worse.champion_value) == ("kept", 110.0, 103.0)
    better = decisions["relaxed_better"]  # relaxed 104 > 103, but one-hot 101 < 103
    assert (better.decision, better.challenger_value, better.champion_value) == ("promoted", 101.0, 103.0)
    assert better.champion_run_id == runs["straight_through"]
    assert registry.champion_run_id(uri, FAIR) == runs["relaxed_better"]
    tags = get_run(uri, runs["relaxed_worse"]).data.tags
    assert tags["champion.metric"] == "val/loss_onehot" and tags["champion.decision"] == "kept"
    assert (float(tags["champion.challenger_value"]), float(tags["champion.incumbent_value"])) == (110.0, 103.0)
    unmeasured = decisions["no_onehot"]  # its val/loss (1.0) is not the declared metric
    assert (unmeasured.decision, unmeasured.promoted, unmeasured.challenger_value) == ("no-metric", False, None)
    assert "val/loss_onehot" in unmeasured.reason


def test_other_likelihood_or_manifest_is_refused_with_the_reason(fair, store):
    uri = fair["uri"]
    refused = fair["decisions"]["other_likelihood"]
    assert (refused.decision, refused.promoted) == ("not-comparable", False)
    other_likelihood = "model.likelihood logistic here, bernoulli for the champion"
    other_data = "dataset.manifest_sha256 bbbbbbbbbbbb here, aaaaaaaaaaaa for the champion"
    assert other_likelihood in refused.reason
    binarized = fair["decisions"]["other_binarization"]  # a bernoulli likelihood's targets: the binarization
    assert binarized.decision == "not-comparable" and "model.binarize threshold here, dynamic for" in binarized.reason
    tags = get_run(uri, fair["runs"]["other_likelihood"]).data.tags
    assert tags["champion.decision"] == "not-comparable" and tags["champion.reason"] == refused.reason
    # the command says why, on its output and on the run
    for run_id, why in ((fair["runs"]["other_likelihood"], other_likelihood), (store["runs"]["other_data"], other_data)):
        proc = cli("promote", run_id, env={"MLFLOW_TRACKING_URI": uri})
        assert proc.exit_code == 3, proc.output
        assert json.loads(proc.stdout)["decision"] == "not-comparable"
        assert "not-comparable" in proc.stderr and why in proc.stderr, proc.stderr
        assert why in get_run(uri, run_id).data.tags["champion.reason"]
    assert registry.champion_run_id(uri, FAIR) == fair["runs"]["relaxed_better"]


def test_validation_scores_one_model_alike_under_either_estimator(digits_dataset):
    """val/loss_onehot is the model's one-hot -ELBO, whichever estimator's settings validate it: the
    same weights validated as a Gumbel-Softmax run (an extra one-hot decoding) and as a straight-through
    run (its own val/loss) draw the same binary images and the same one-hot codes, so the figures agree;
    the relaxed val/loss is another figure. Mixture and Gaussian latents log no such metric."""
    from pipeline.config import load_config
    from pipeline.data import read_manifest
    from pipeline.train.validate import evaluate_split

    manifest = read_manifest(digits_dataset)
    metrics = {}
    for estimator in ("gumbel-softmax", "straight-through"):
        cfg = load_config("configs/digits-categorical.yaml", [f"data.url={digits_dataset}",
                                                              f"model.latent.estimator={estimator}"])
        torch.manual_seed(0)
        model = build_vae(cfg.model, image_shape=(8, 8), binarize=cfg.model.binarize)
        metrics[estimator] = evaluate_split(model, manifest, digits_dataset, "val", rank=0, world_size=1, batch_size=64,
                                       cfg=cfg, step=0)
    straight, relaxed = metrics["straight-through"], metrics["gumbel-softmax"]
    assert straight["val/loss_onehot"] == straight["val/loss"]
    # float32 sums in another order: equal to ~1e-7; another code or image would move it by far more
    assert relaxed["val/loss_onehot"] == pytest.approx(straight["val/loss"], rel=1e-6)
    assert abs(relaxed["val/loss"] - relaxed["val/loss_onehot"]) > 1e-3
    gaussian = load_config("configs/digits-categorical.yaml", [f"data.url={digits_dataset}", "model.latent.kind=gaussian"])
    model = build_vae(gaussian.model, image_shape=(8, 8), binarize=gaussian.model.binarize)
    assert "val/loss_onehot" not in evaluate_split(model, manifest, digits_dataset, "val", rank=0, world_size=1,
                                                   batch_size=64, cfg=gaussian, step=0)


@pytest.mark.timeout(600)
def test_real_runs_of_each_estimator_on_shared_validation_shards_compare_and_a_registry_failure_shows(
        ray_cluster, digits_dataset, tmp_path, tracking_uri, capsys):
    """Two trained runs, one straight-through (model.latent.estimator), one Gumbel-Softmax, on the same
    validation shards but other training shards. They are compared (on `dataset.val_sha256`, not
    refused as other data) on the one-hot -ELBO both log as val/loss_onehot; a registry that refuses
    the model leaves a warning and a tag, and the run stays FINISHED."""
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
    assert first.digest() != second.digest() and champion.val_data_id(first) == champion.val_data_id(second)

    results, decisions = [], []
    for name, data in (("straight-through", digits_dataset), ("gumbel-softmax", str(fewer))):
        config = load_config("configs/digits-categorical.yaml", [
            f"data.url={data}", f"tracking.uri={tracking_uri}", f"train.storage={tmp_path / 'ray'}",
            "train.epochs=1", "tracking.experiment=shared-val", f"tracking.run_name={name}",
            f"model.latent.estimator={name}"])
        results.append(train(config))
        decisions.append(after_training(config, results[-1]))
    assert decisions[0].decision == "first"
    runs = [get_run(tracking_uri, r.run_id) for r in results]
    assert [r.data.params["model.latent.estimator"] for r in runs] == ["straight-through", "gumbel-softmax"]
    onehot = [r.data.metrics["val/loss_onehot"] for r in runs]
    relaxed = runs[1].data.metrics["val/loss"]
    # straight-through validates on one-hot codes already: its val/loss is the one-hot -ELBO;
    # the relaxed run's val/loss is the relaxed one, a different figure
    assert onehot[0] == runs[0].data.metrics["val/loss"] and onehot[1] != relaxed
    assert [r.val_loss for r in results] == [r.data.metrics["val/loss"] for r in runs]
    # compared, not "not-comparable": the outcome is the one the two runs' one-hot -ELBOs make
    assert onehot[0] != onehot[1]
    expected = "promoted" if onehot[1] < onehot[0] else "kept"
    assert decisions[1].decision == expected, (onehot, relaxed, decisions[1].reason)
    assert decisions[1].metric == "val/loss_onehot"
    assert (decisions[1].challenger_value, decisions[1].champion_value) == (onehot[1], onehot[0])
    assert decisions[1].champion_run_id == results[0].run_id
    tags = get_run(tracking_uri, results[1].run_id).data.tags
    assert tags["champion.metric"] == "val/loss_onehot" and tags["champion.decision"] == expected
    winner = results[1] if expected == "promoted" else results[0]
    assert registry.champion_run_id(tracking_uri, "shared-val") == winner.run_id
    print(f"one-hot -ELBO {onehot}, relaxed val/loss {relaxed:.4f}: {expected}")

    refused = config.model_copy(deep=True)
    refused.tracking.registered_model = "team/digits"  # MLflow refuses '/' in a model name
    assert after_training(refused, results[1]) is None
    run = get_run(tracking_uri, results[1].run_id)
    assert run.data.tags.get("champion.decision") == "registry-failed" and "team/digits" in run.data.tags["champion.reason"]
    assert "warning: model registry step failed, champion unchanged" in capsys.readouterr().err
    assert run.info.status == "FINISHED"
