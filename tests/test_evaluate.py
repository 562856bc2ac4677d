"""`pipeline evaluate` and the training-time latent monitors (train/validate.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import LatentConfig, ModelConfig, load_config
from pipeline.data import Split, eval_batches, read_manifest, write_shards
from pipeline.evaluate.likelihood import evaluate_model
from pipeline.models import build_vae, exact_log_px_and_elbo
from pipeline.train.validate import cluster_accuracy, evaluate_split

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits-categorical.yaml"


def _digits_config(dataset: str, uri: str, tmp_path: Path, *extra: str):
    return load_config(DIGITS_CONFIG, [f"data.url={dataset}", f"tracking.uri={uri}",
                                       f"train.storage={tmp_path / 'ray'}", *extra])


@pytest.mark.timeout(400)
def test_evaluate_a_trained_run_logs_into_the_same_run(digits_progress_run):
    """The run `pipeline train` trained (tests/conftest.py: 2 epochs of digits, 3 variables x 4 classes =
    64 codes, small enough for the exact figures too), evaluated into the same run."""
    assert digits_progress_run["run_id"], digits_progress_run["result"].output[-4000:]
    tracking_uri = digits_progress_run["uri"]
    run_id = digits_progress_run["run_id"]
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    for key in ("val/loss", "latent/active_units", "latent/perplexity", "val/kl_latent_2"):
        assert key in run.data.metrics, key
    assert 0 <= run.data.metrics["latent/active_units"] <= 3

    cli = CliRunner()
    out = cli.invoke(app, ["evaluate", run_id, "--importance-samples", "200", "--json",
                           "--tracking-uri", tracking_uri])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.stdout[out.stdout.index("{"):])
    metrics = figures["metrics"]
    assert figures["samples"] == 250 and figures["split"] == "test"
    assert set(metrics) >= {"test/loss", "test/recon", "test/kl", "test/nll_is_k200", "test/nll_exact", "test/loss_exact"}
    assert all(math.isfinite(v) for v in metrics.values())
    # -log p(x) <= IS estimate (an upper bound on -log p in expectation, tight here) <= exact -ELBO
    assert metrics["test/nll_exact"] <= metrics["test/nll_is_k200"] + 0.05
    assert metrics["test/nll_is_k200"] <= metrics["test/loss_exact"] + 1e-6
    assert abs(metrics["test/loss"] - metrics["test/loss_exact"]) < 0.05 * metrics["test/loss_exact"]

    logged = client.get_run(run_id).data.metrics
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value), key
    last_val_step = max(m.step for m in client.get_metric_history(run_id, "val/loss"))
    assert [m.step for m in client.get_metric_history(run_id, "test/loss")] == [last_val_step]

    # Plain-text output names every figure. Evaluating the validation split must not add a second
    # point to training's own val/* histories: its figures go under eval/val/.
    val_history = [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")]
    text = cli.invoke(app, ["evaluate", run_id, "-k", "5", "--split", "val", "--tracking-uri", tracking_uri])
    assert text.exit_code == 0, text.output
    assert "eval/val/nll_is_k5:" in text.stdout and "eval/val/nll_exact:" in text.stdout
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")] == val_history
    assert "eval/val/loss" in client.get_run(run_id).data.metrics


def test_evaluate_unknown_run_fails_clearly(tracking_uri):
    out = CliRunner().invoke(app, ["evaluate", "0123456789abcdef", "--tracking-uri", tracking_uri])
    assert out.exit_code == 1
    assert "no MLflow run '0123456789abcdef'" in out.output


def test_evaluate_missing_dataset_fails_clearly(tmp_path, tracking_uri, digits_dataset):
    from pipeline.runs import store

    config = _digits_config(str(tmp_path / "gone"), tracking_uri, tmp_path)
    run_id = store.start_run(config, tracking_uri=tracking_uri, manifest_digest="0" * 64)
    out = CliRunner().invoke(app, ["evaluate", run_id, "--tracking-uri", tracking_uri])
    assert out.exit_code == 1
    assert "gone" in out.output and "--data)" in out.output
    # With a readable dataset but no weights or model logged, the error says that instead.
    out = CliRunner().invoke(app, ["evaluate", run_id, "--tracking-uri", tracking_uri, "--data", digits_dataset])
    assert out.exit_code == 1 and "checkpoint/model.pt" in out.output


def test_a_run_whose_start_was_cut_short_gets_its_config_when_resumed(tmp_path, tracking_uri, digits_dataset):
    """A driver killed between creating a run and logging its config.yaml (a sweep killed while a trial
    starts) leaves a run nothing can load; resuming it logs what the start left out."""
    from pipeline.runs import store

    config = _digits_config(digits_dataset, tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)
    experiment = store.ensure_experiment(tracking_uri, config.tracking.experiment)
    run_id = client.create_run(experiment, tags={"sweep.trial_key": "k"}).info.run_id  # then the kill
    client.log_param(run_id, "train.epochs", str(config.train.epochs))  # a param or two may have landed
    store.reopen_run(tracking_uri, run_id, config)
    assert store.download_config(tracking_uri, run_id) == store.config_yaml(config)
    assert client.get_run(run_id).data.params == {k: store.param_value(v) for k, v in config.flat().items()}
    store.reopen_run(tracking_uri, run_id, config)  # a second resume changes nothing
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_evaluate_model_on_batches_matches_exact_figures() -> None:
    torch.manual_seed(0)
    model = build_vae(ModelConfig(hidden=[8], latent=LatentConfig(variables=2, categories=3)), input_dim=6).eval()
    x = torch.rand(40, 6).bernoulli()
    batches = [(x[:25], None), (x[25:], None)]
    metrics, count = evaluate_model(model, batches, split="test", importance_samples=3000)
    log_px, elbo = exact_log_px_and_elbo(model, x)
    assert count == 40
    assert metrics["test/nll_exact"] == pytest.approx(-log_px.mean().item(), abs=1e-4)
    assert metrics["test/loss_exact"] == pytest.approx(-elbo.mean().item(), abs=1e-4)
    assert metrics["test/nll_is_k3000"] == pytest.approx(metrics["test/nll_exact"], abs=0.01)
    assert metrics["test/loss"] == pytest.approx(metrics["test/recon"] + metrics["test/kl"])
    assert abs(metrics["test/loss"] - metrics["test/loss_exact"]) < 0.5  # one-sample estimate of the same


# ---------------------------------------------------------------- monitors in validate.py

def _labelled_dataset(root: Path) -> str:
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        labels = rng.integers(0, 3, n)
        images = np.zeros((n, 4, 4), dtype=np.uint8)
        for i, label in enumerate(labels):  # each label lights its own rows: clusters are easy to find
            images[i, label] = 255
        return Split(images=images, labels=labels)

    write_shards({"train": split(60), "val": split(45)}, str(root), source="synthetic", samples_per_shard=20,
                 progress=False)
    return str(root)


def test_evaluate_split_reports_active_units_and_cluster_accuracy(tmp_path) -> None:
    dataset = _labelled_dataset(tmp_path / "labelled")
    manifest = read_manifest(dataset)
    cfg = load_config(DIGITS_CONFIG, [f"data.url={dataset}", "model.binarize=threshold", "model.hidden=[16]",
                                      "model.latent.kind=mixture", "model.latent.variables=2",
                                      "model.latent.categories=3"])
    torch.manual_seed(0)
    model = build_vae(cfg.model, image_shape=(4, 4), binarize=cfg.model.binarize)
    metrics = evaluate_split(model, manifest, dataset, "val", rank=0, world_size=1, batch_size=10, cfg=cfg, step=0)
    assert {"val/loss", "val/kl_latent_0", "val/kl_latent_1", "latent/active_units", "latent/perplexity",
            "val/cluster_acc"} <= set(metrics)
    assert "val/kl_latent_2" not in metrics  # mixture: index 0 is y, index 1 is z
    assert metrics["val/loss"] == pytest.approx(metrics["val/recon"] + metrics["val/kl"])
    assert metrics["val/kl"] == pytest.approx(metrics["val/kl_latent_0"] + metrics["val/kl_latent_1"])
    # Recompute both monitors directly from the posterior over the same 45 inputs.
    x, labels = map(torch.cat, zip(*eval_batches(manifest, dataset, split="val", rank=0, world_size=1,
                                                 batch_size=45)))
    assert x.dtype == torch.uint8 and x.shape == (45, 1, 4, 4)
    with torch.no_grad():
        params = model.encode(model.prepare(x)[0])  # threshold: deterministic, as in evaluate_split
    means = model.latent.posterior_mean(params)
    assert metrics["latent/active_units"] == float((means.var(0, unbiased=False) > 0.01).sum())
    counts = np.zeros((3, 3))
    np.add.at(counts, (model.latent.cluster(params).numpy(), labels.numpy()), 1)
    assert metrics["val/cluster_acc"] == pytest.approx(cluster_accuracy(counts))


def test_cluster_accuracy_uses_best_one_to_one_mapping() -> None:
    counts = np.array([[0, 10, 0], [8, 0, 2], [0, 0, 5]])  # component 0 -> label 1, 1 -> 0, 2 -> 2
    assert cluster_accuracy(counts) == pytest.approx(23 / 25)
    assert math.isnan(cluster_accuracy(np.zeros((2, 2))))
    # More components than labels: the extra component's samples count as errors.
    assert cluster_accuracy(np.array([[5, 0], [0, 5], [5, 0]])) == pytest.approx(10 / 15)


def test_evaluate_reads_with_the_runs_read_options(tmp_path, tracking_uri, digits_dataset) -> None:
    """The run's data.on_corrupt (and retries, cache) apply to `pipeline evaluate` too: with skip, a
    damaged test shard is skipped and the rest evaluated; with error, the shard is named."""
    import shutil

    from pipeline.runs import store

    dataset = tmp_path / "digits"
    shutil.copytree(digits_dataset, dataset)
    manifest = read_manifest(str(dataset))
    victim = dataset / manifest.splits["test"].shards[0].path
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # ~half of the 250 test samples survive

    results = {}
    for policy in ("skip", "error"):
        config = _digits_config(str(dataset), tracking_uri, tmp_path, f"data.on_corrupt={policy}",
                                f"data.cache_dir={tmp_path / 'cache'}", "model.latent.variables=2")
        run_id = store.start_run(config, tracking_uri=tracking_uri, manifest_digest=manifest.digest())
        weights = tmp_path / policy / "model.pt"
        weights.parent.mkdir()
        torch.save(build_vae(config.model, image_shape=(1, 8, 8)).state_dict(), weights)
        store.log_artifact_files(tracking_uri, run_id, [weights], artifact_path="checkpoint")
        results[policy] = CliRunner().invoke(app, ["evaluate", run_id, "-k", "2", "--json", "--tracking-uri",
                                                   tracking_uri])
    skipped = results["skip"]
    assert skipped.exit_code == 0, skipped.output
    assert 0 < json.loads(skipped.stdout[skipped.stdout.index("{"):])["samples"] < 250
    assert results["error"].exit_code == 1 and victim.name in results["error"].output
