"""Renamed config keys: configs, overrides and logged runs that still name the old keys load, each with a
one-line notice naming old -> new; what the keys mean is unchanged; unknown keys are still refused."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

import pipeline.config as config_module
from pipeline.config import RENAMED_KEYS, ConfigError, RunConfig, load_config, parse_config, upgrade_params

OLD_FILE = """\
data:
  url: data/digits
  binarize: threshold
model:
  likelihood: bernoulli
  latent:
    hard: true
    tau_schedule: cosine
    anneal_rate: 1.0e-4
    anneal_every: 500
    tau_steps: 2000
"""


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch, caplog):
    monkeypatch.setattr(config_module, "_NOTICES", set())  # each notice is given once per process
    caplog.set_level(logging.WARNING, logger="pipeline.config")


def _notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.config"]


def _as_logged_before_the_rename(config: RunConfig) -> dict:
    """A run's config.yaml as a run logged it before the rename: the resolved tree under the old names."""
    tree = config.model_dump()
    data, model, latent = tree["data"], tree["model"], tree["model"]["latent"]
    data["binarize"] = model.pop("binarize")
    latent["hard"] = latent.pop("estimator") == "straight-through"
    latent["hard_from_step"] = latent.pop("straight_through_from_step")
    exponential, cosine = latent.pop("tau_exponential"), latent.pop("tau_cosine")
    latent["anneal_rate"], latent["anneal_every"] = exponential["rate"], exponential["every"]
    latent["tau_steps"] = cosine["steps"]
    return tree


def test_a_config_file_with_the_old_keys_loads_them_at_their_new_places(tmp_path, caplog) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(OLD_FILE)
    cfg = load_config(path)
    latent = cfg.model.latent
    assert cfg.model.binarize == "threshold" and not hasattr(cfg.data, "binarize")
    assert latent.estimator == "straight-through" and latent.straight_through_from_step is None
    assert (latent.tau_exponential.rate, latent.tau_exponential.every, latent.tau_cosine.steps) == (1e-4, 500, 2000)
    flat = cfg.flat()
    assert not {"data.binarize", "model.latent.hard", "model.latent.tau_steps", "model.latent.anneal_rate"} & set(flat)
    assert flat["model.latent.tau_cosine.steps"] == 2000
    [notice] = _notices(caplog)  # one line for the file, naming each old key and its new one
    assert "\n" not in notice and notice.startswith(f"{path}: deprecated config keys")
    for old in ("data.binarize -> model.binarize", "model.latent.hard: true -> model.latent.estimator: straight-through",
                "model.latent.anneal_rate -> model.latent.tau_exponential.rate",
                "model.latent.anneal_every -> model.latent.tau_exponential.every",
                "model.latent.tau_steps -> model.latent.tau_cosine.steps"):
        assert old in notice
    load_config(path)
    assert len(_notices(caplog)) == 1  # once per process


def test_a_logged_run_config_with_the_old_keys_parses_as_the_same_run(caplog) -> None:
    new = parse_config({"data": {"url": "data/x"}}, ["model.binarize=none", "model.latent.straight_through_from_step=40",
                                                    "model.latent.tau_exponential.rate=0.001"])
    logged = _as_logged_before_the_rename(new)
    assert logged["data"]["binarize"] == "none" and logged["model"]["latent"]["hard"] is False
    before = yaml.safe_dump(logged)
    assert parse_config(logged, source="config.yaml of run abc") == new
    assert yaml.safe_dump(logged) == before  # the caller's tree is left as it was
    assert RunConfig.model_validate(logged) == new  # the worker's way in, too
    notice = _notices(caplog)[0]
    assert notice.startswith("config.yaml of run abc: deprecated config keys")
    assert "model.latent.hard: false -> model.latent.estimator: gumbel-softmax" in notice
    assert "model.latent.hard_from_step -> model.latent.straight_through_from_step" in notice


def test_old_key_overrides_set_the_new_keys_and_a_file_may_extend_an_old_base(tmp_path, caplog) -> None:
    cfg = load_config("configs/digits-categorical.yaml", ["model.latent.hard=true", "data.binarize=none",
                                                          "model.latent.tau_steps=7"])
    latent = cfg.model.latent
    assert (latent.estimator, cfg.model.binarize, latent.tau_cosine.steps) == ("straight-through", "none", 7)
    relaxed = load_config("configs/digits-categorical.yaml", ["model.latent.hard=false"])
    assert relaxed.model.latent.estimator == "gumbel-softmax"
    assert any(n.startswith("override: ") and "model.latent.hard: true -> model.latent.estimator: straight-through" in n
               for n in _notices(caplog))
    (tmp_path / "base.yaml").write_text(OLD_FILE)  # an old base, a child by the new names: the child wins
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  binarize: dynamic\n  latent:\n"
                                         "    estimator: gumbel-softmax\n    tau_cosine: {steps: 9}\n")
    child = load_config(tmp_path / "child.yaml")
    assert (child.model.binarize, child.model.latent.estimator, child.model.latent.tau_cosine.steps) == (
        "dynamic", "gumbel-softmax", 9)
    assert child.model.latent.tau_exponential.rate == 1e-4  # from the base, moved


def test_unknown_keys_are_still_refused_by_name_and_a_key_given_both_ways_too(tmp_path) -> None:
    for bad, named in (("model.latent.hardd=true", "unknown key 'model.latent.hardd'"),
                       ("model.latent.tau_exponential.anneal_rate=1",
                        "unknown key 'model.latent.tau_exponential.anneal_rate'"),
                       ("model.latent.binarize=none", "unknown key 'model.latent.binarize'"),
                       ("data.hard=true", "unknown key 'data.hard'")):
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            parse_config({"data": {"url": "x"}}, [bad])
    with pytest.raises(ConfigError, match="unknown key 'model.latent.tau_cosine.rate'"):
        parse_config({"data": {"url": "x"}, "model": {"latent": {"tau_cosine": {"rate": 1}}}})
    both = tmp_path / "both.yaml"
    both.write_text("data: {url: x, binarize: none}\nmodel: {binarize: threshold}\n")
    with pytest.raises(ConfigError, match=r"data\.binarize is the old name of model\.binarize: give only model\.bin"):
        load_config(both)
    with pytest.raises(ConfigError, match="model.latent.hard"):
        parse_config({"data": {"url": "x"}, "model": {"latent": {"hard": "sometimes"}}})
    for bad in ({"kind": "gaussian", "hard_from_step": 10},
                {"estimator": "straight-through", "straight_through_from_step": 10}):
        with pytest.raises(ConfigError, match="straight_through_from_step"):
            parse_config({"data": {"url": "x"}, "model": {"latent": bad}})


def test_the_shipped_configs_name_no_old_key(caplog) -> None:
    from pathlib import Path

    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path, ["data.url=x"])
        assert not [old for old in RENAMED_KEYS if f"{old}=" in path.read_text()], path  # nor their comments
    assert _notices(caplog) == []


def test_pipeline_config_prints_the_new_keys_and_one_notice_line(tmp_path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(OLD_FILE)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "config", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["binarize"] == "threshold" and "binarize" not in printed["data"]
    assert printed["model"]["latent"]["estimator"] == "straight-through"
    assert printed["model"]["latent"]["tau_cosine"] == {"steps": 2000}
    lines = [line for line in proc.stderr.splitlines() if "deprecated" in line]
    assert len(lines) == 1 and "model.latent.hard: true -> model.latent.estimator: straight-through" in lines[0]


# --- runs logged before the rename ------------------------------------------------------------------


def _run(**params: str):
    return SimpleNamespace(data=SimpleNamespace(params=params, tags={}, metrics={}))


def test_logged_params_of_an_older_run_read_under_the_new_names() -> None:
    old = {"data.binarize": "dynamic", "model.latent.hard": "True", "model.latent.hard_from_step": "None",
           "model.latent.anneal_rate": "3e-05", "model.latent.tau_steps": "150000", "model.likelihood": "bernoulli"}
    params = upgrade_params(old)
    assert params["model.binarize"] == "dynamic" and params["model.latent.estimator"] == "straight-through"
    assert params["model.latent.straight_through_from_step"] == "None"
    assert (params["model.latent.tau_exponential.rate"], params["model.latent.tau_cosine.steps"]) == ("3e-05", "150000")
    assert upgrade_params({"model.binarize": "none", "data.binarize": "x"})["model.binarize"] == "none"


def test_a_champion_logged_before_the_rename_is_compared_under_the_same_likelihood() -> None:
    from pipeline.ops.champion import _same_likelihood

    champion = _run(**{"model.likelihood": "bernoulli", "data.binarize": "dynamic"})  # an older run's params
    same, _ = _same_likelihood(_run(**{"model.likelihood": "bernoulli", "model.binarize": "dynamic"}), champion)
    assert same
    same, why = _same_likelihood(_run(**{"model.likelihood": "bernoulli", "model.binarize": "threshold"}), champion)
    assert not same and why == "model.binarize threshold here, dynamic for the champion"


def test_warm_start_from_a_champion_logged_before_the_rename(monkeypatch) -> None:
    """Warm start compares the champion's logged model.* params with this config's: an older champion's
    params under the old names still match (and the binarization, never part of it, still does not count)."""
    from pipeline.ops import retrain
    from pipeline.runs.store import param_value

    config = parse_config({"data": {"url": "x"}}, ["model.binarize=threshold",
                                                   "model.latent.estimator=straight-through"])
    renamed = {new: old for old, new in RENAMED_KEYS.items()}
    old = {renamed.get(k, k): param_value(v) for k, v in config.flat().items()}  # as an older run logged them
    old["model.latent.hard"], old["data.binarize"] = "True", "dynamic"
    monkeypatch.setattr(retrain.store, "get_run", lambda uri, run_id: _run(**old))
    assert retrain._same_architecture("sqlite:///x.db", "old", config)
    old["model.hidden"] = "[8]"
    assert not retrain._same_architecture("sqlite:///x.db", "old", config)


def _log_old_config(uri: str, run_id: str) -> None:
    """Replace a run's config.yaml by the one an older run logged: the same settings, the old key names."""
    from mlflow.tracking import MlflowClient

    from pipeline.runs.store import download_config

    logged = parse_config(yaml.safe_load(download_config(uri, run_id)))
    MlflowClient(uri).log_text(run_id, yaml.safe_dump(_as_logged_before_the_rename(logged)), "config.yaml")
    assert "hard:" in download_config(uri, run_id)


def test_a_run_logged_with_the_old_keys_loads_and_rebuilds_its_model(tracking_uri, caplog) -> None:
    """`pipeline evaluate`/`encode`/`export` and warm start read a run through runs.load: its config.yaml
    under the old names is read at the new places and its model rebuilt with its own weights."""
    import torch

    from ops_runs import make_run
    from pipeline.runs.load import load_model

    run_id = make_run(tracking_uri, "renamed", "old", val_loss=1.0, overrides={
        "model.binarize": "threshold", "model.latent.estimator": "straight-through"})
    _log_old_config(tracking_uri, run_id)
    loaded = load_model(run_id, tracking_uri=tracking_uri, image_shape=(64,))
    assert loaded.config.model.binarize == "threshold" and loaded.config.model.latent.estimator == "straight-through"
    assert loaded.model.latent.hard and loaded.model.likelihood.binarize == "threshold"
    assert loaded.model(torch.rand(2, 64)).loss.isfinite()
    notice = next(n for n in _notices(caplog) if run_id in n)
    assert notice.startswith(f"config.yaml of run {run_id}: deprecated config keys") and "data.binarize" in notice


def test_resuming_a_run_logged_with_the_old_keys_checks_its_schedules_under_the_new_names(
        tmp_path, tracking_uri, monkeypatch) -> None:
    from pipeline.runs.store import start_run
    from pipeline.train.trainer import resume_config

    cosine = parse_config({"data": {"url": str(tmp_path)}, "tracking": {"uri": tracking_uri, "experiment": "resume"},
                           "model": {"latent": {"tau_schedule": "cosine", "tau_cosine": {"steps": 500}}}})
    run_id = start_run(cosine, tracking_uri=tracking_uri, manifest_digest="x")
    _log_old_config(tracking_uri, run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    for override in ("model.latent.tau_cosine.steps=900", "model.latent.tau_steps=900"):  # either name
        with pytest.raises(ConfigError, match=r"model\.latent\.tau_cosine\.steps 500 -> 900"):
            resume_config(run_id, config_path=None, overrides=[override])
    cfg, same = resume_config(run_id, config_path=None, overrides=["train.workers=1"])
    assert same == run_id and cfg.model.latent.tau_cosine.steps == 500 and cfg.train.workers == 1
