"""Config: every shipped YAML loads; overrides; unknown keys and wrong types are named."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
DEFAULT = Path(__file__).parent.parent / "configs" / "digits-categorical.yaml"


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"digits-categorical.yaml", "mnist-categorical.yaml", "mnist-gaussian.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    config = load_config(path)
    assert config.train.batch_size % config.train.workers == 0
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"pipeline train configs/{path.name}" in line for line in header), "header must give the launch command"


def test_required_keys_exist_and_overrides_apply():
    config = load_config(
        DEFAULT,
        ["train.epochs=3", "model.latent.categories=10", "train.lr=1e-4", "data.url=s3://bucket/ds",
         "model.hidden=[64, 32]", "model.latent.kind=gaussian", "tracking.experiment=x", "train.seed=7"],
    )
    assert config.train.epochs == 3
    assert config.model.latent.categories == 10
    assert config.train.lr == pytest.approx(1e-4)
    assert config.data.url == "s3://bucket/ds"
    assert config.model.hidden == [64, 32]
    assert config.model.latent.kind == "gaussian"
    assert config.tracking.experiment == "x"
    flat = config.flat()
    for key in ["data.url", "train.epochs", "train.batch_size", "train.workers", "train.lr", "train.seed",
                "model.latent.kind", "model.latent.variables", "model.latent.categories", "tracking.experiment"]:
        assert key in flat


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, ["train.epoch=3"])
    message = str(err.value)
    assert "train.epoch" in message and "epochs" in message and "batch_size" in message


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="trian"):
        load_config(DEFAULT, ["trian.epochs=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, ["train.epochs=many"])
    assert "train.epochs" in str(err.value) and "many" in str(err.value)


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="model.latent.kind"):
        load_config(DEFAULT, ["model.latent.kind=dirichlet"])


def test_batch_must_split_across_workers():
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config({"data": {"url": "x"}, "train": {"batch_size": 5, "workers": 2}})


def test_missing_data_url_is_named():
    with pytest.raises(ConfigError, match="data"):
        parse_config({"train": {"epochs": 1}})


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(DEFAULT, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parent.parent / "docs" / "guides" / "configuration.md").read_text()
    config = load_config(DEFAULT)
    missing = [key for key in config.flat() if f"`{key}`" not in readme]
    assert missing == [], f"docs/guides/configuration.md lacks {missing}"


def test_worker_range_makes_training_elastic_with_a_partition_count_every_size_divides():
    config = load_config(DEFAULT, ["train.workers=2..4", "train.batch_size=120"])
    assert (config.train.min_workers, config.train.workers, config.train.elastic) == (2, 4, True)
    assert config.partitions == 12  # lcm(2, 3, 4): 2, 3 or 4 workers all serve whole partitions
    assert config.flat()["train.min_workers"] == 2 and config.flat()["train.workers"] == 4
    assert load_config(DEFAULT, ["train.workers=4"]).train.elastic is False
    logged = parse_config(config.model_dump(mode="json"), ["train.workers=2"])  # e.g. --resume RUN -o train.workers=2
    assert (logged.train.min_workers, logged.train.workers) == (None, 2)
    with pytest.raises(ConfigError, match="MIN must not exceed MAX"):
        load_config(DEFAULT, ["train.workers=4..2"])
    with pytest.raises(ConfigError, match=r"train.workers=3 \(each worker"):
        load_config(DEFAULT, ["train.workers=2..4", "train.batch_size=64"])  # 3 workers cannot split 64
    with pytest.raises(ConfigError, match="every worker count in train.workers=1..2"):
        load_config(DEFAULT, ["train.workers=1..2", "data.partitions=1"])


def test_tracking_store_precedence_is_flag_environment_config_default(tmp_path, monkeypatch) -> None:
    """One rule for every command: --tracking-uri > $MLFLOW_TRACKING_URI > the config's tracking.uri >
    ./mlflow.db (absolute, for workers in other directories)."""
    from pipeline.runs.store import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri(config="http://config:5000") == "http://config:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(config="http://config:5000") == "http://env:5000"
    assert resolve_tracking_uri("http://flag:5000", config="http://config:5000") == "http://flag:5000"
    assert resolve_tracking_uri("sqlite:///runs.db") == f"sqlite:///{tmp_path / 'runs.db'}"


def test_a_config_names_its_base_and_overrides_a_few_keys(tmp_path) -> None:
    """`base: other.yaml` (relative to the file): the base's tree, this file's keys on top (a mapping merges, a list
    or scalar replaces); unknown keys are still refused by name; cycles and missing bases are named."""
    import subprocess
    import sys

    from pipeline.config import load_config

    (tmp_path / "parent.yaml").write_text("data: {url: d, image_size: [32, 32]}\nmodel: {hidden: [8, 4], latent: {categories: 7}}\n"
                                          "train: {epochs: 3, lr: 0.01}\n")
    (tmp_path / "variants").mkdir()
    (tmp_path / "variants" / "child.yaml").write_text("base: ../parent.yaml\nmodel: {hidden: [16], latent: {variables: 5}}\n"
                                                      "train: {epochs: 9}\n")
    cfg = load_config(tmp_path / "variants" / "child.yaml", ["train.lr=0.5"])
    assert cfg.model.hidden == [16] and cfg.model.latent.categories == 7 and cfg.model.latent.variables == 5
    assert cfg.train.epochs == 9 and cfg.train.lr == 0.5 and cfg.data.image_size == [32, 32]

    (tmp_path / "typo.yaml").write_text("base: parent.yaml\ntrain: {epoch: 9}\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml \(the base of"):
        load_config(tmp_path / "orphan.yaml")

    shown = subprocess.run([sys.executable, "-m", "pipeline", "config", str(tmp_path / "variants" / "child.yaml")],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "base" not in shown.stdout and "categories: 7" in shown.stdout, shown.stderr


def test_overrides_leave_the_callers_tree_alone() -> None:
    tree = {"data": {"url": "x"}, "train": {"epochs": 2}}
    assert parse_config(tree, ["train.epochs=5"]).train.epochs == 5
    assert tree == {"data": {"url": "x"}, "train": {"epochs": 2}}


def test_mlflow_fluent_calls_leave_the_process_store_alone(tmp_path, monkeypatch) -> None:
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; the product's fluent calls (log_model,
    registering a model version) run inside fluent_store, which puts the variable back as it was."""
    import os

    from pipeline.runs.store import fluent_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with fluent_store(f"sqlite:///{tmp_path / 'a.db'}"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    with fluent_store(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://env:5000"
