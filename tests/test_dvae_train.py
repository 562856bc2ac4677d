"""A short grid dVAE training (configs/images-dvae.yaml at test widths) on RGB photo crops on 2 Ray
workers: its schedules, code-use metrics, per-epoch images at their steps and the model land in one
MLflow run. Real Ray cluster, real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.train.trainer import train
from test_image_stream import photo_crops, write_image_dataset

REPO = Path(__file__).resolve().parents[1]
DVAE_CONFIG = REPO / "configs" / "images-dvae.yaml"


@pytest.mark.timeout(500)
def test_dvae_on_two_workers_lands_schedules_code_use_and_per_epoch_images(ray_cluster, tmp_path, tracking_uri):
    dataset = str(tmp_path / "photos")
    write_image_dataset(dataset, photo_crops(64, seed=2), per_shard=16)
    config = load_config(DVAE_CONFIG, [
        f"data.url={dataset}", f"tracking.uri={tracking_uri}", f"train.storage={tmp_path / 'ray'}",
        "data.image_size=[16, 16]", "model.channels=[8, 8, 16]", "model.codebook_dim=8",
        "model.latent.categories=32", "train.batch_size=16", "train.epochs=2", "train.log_every=2",
        "train.lr_warmup_steps=2", "train.kl_warmup_steps=4", "model.latent.tau_steps=6",
    ])
    result = train(config)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("val/psnr", "val/mse", "latent/perplexity", "latent/dead_codes", "latent/codes_used",
                "latent/code_perplexity", "latent/codebook_perplexity_soft", "train/kl_weight", "train/lr",
                "train/temperature"):
        assert key in metrics, key
    assert 0 <= metrics["latent/dead_codes"] <= 1 and metrics["val/psnr"] > 0
    assert metrics["latent/dead_codes"] == pytest.approx(1 - metrics["latent/codes_used"])
    # the argmax perplexity cannot exceed the number of codes in use (32 codes here)
    assert 1 <= metrics["latent/code_perplexity"] <= metrics["latent/codes_used"] * 32 + 1e-9
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    beta = [m.value for m in sorted(client.get_metric_history(result.run_id, "train/kl_weight"), key=lambda m: m.step)]
    assert beta[0] < beta[-1] == pytest.approx(1.0)  # warmed up from ~0 to beta
    tau = [m.value for m in sorted(client.get_metric_history(result.run_id, "train/temperature"), key=lambda m: m.step)]
    assert tau[0] > tau[-1] == pytest.approx(1 / 16)  # cosine anneal reached its floor

    val_steps = sorted(m.step for m in client.get_metric_history(result.run_id, "val/loss"))
    stepped = [a.path for a in client.list_artifacts(result.run_id, "images")]
    for key in ("reconstructions", "kl_heatmap", "code_usage"):  # one image per epoch, at the epoch's step
        steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in stepped
                       if p.startswith(f"images/{key}+step+") and p.endswith(".png"))
        assert steps == val_steps, (key, steps, stepped)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{result.run_id}'")
    assert [m.name for m in models] == ["model"]
