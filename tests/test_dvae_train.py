"""A short grid dVAE training (configs/images-dvae.yaml at test widths) on RGB photo crops on 2 Ray
workers: its schedules, code-use metrics, per-epoch images at their steps and the model land in one
MLflow run. Real `pipeline train` on a real Ray cluster, real sqlite MLflow store (the session's run,
tests/conftest.py::grid_dvae_run, which tests/test_tokenizer.py reads too)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.data import eval_batches, read_manifest
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from pipeline.train.schedules import kl_weight, learning_rate, temperature
from conftest import GRID_DVAE

TRAIN_IMAGES, BATCH, EPOCHS, LOG_EVERY = (GRID_DVAE[key] for key in ("images", "batch", "epochs", "log_every"))


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), (key, sorted(steps))  # none logged twice
    return {m.step: m.value for m in points}


def _final_checkpoint(storage: Path) -> dict:
    """The run's last checkpoint in its Ray storage: the one at the highest step."""
    states = [load_checkpoint(path.parent) for path in storage.rglob(CHECKPOINT_FILE)]
    assert states, f"no checkpoint under {storage}"
    return max(states, key=lambda state: state["step"])


@pytest.mark.timeout(500)
def test_dvae_on_two_workers_lands_schedules_code_use_and_per_epoch_images(grid_dvae_run):
    """The session's grid dVAE run (tests/conftest.py): `pipeline train` on the Ray cluster, 2 epochs."""
    tracking_uri, dataset, config = grid_dvae_run["uri"], grid_dvae_run["dataset"], grid_dvae_run["config"]
    samples = grid_dvae_run["samples"]
    assert config.train.workers == 2 and config.train.ema and config.model.restart_dead_codes  # as shipped
    run_id = grid_dvae_run["run_id"]
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    total_steps = TRAIN_IMAGES // BATCH * EPOCHS
    assert f"after {EPOCHS} epochs, {total_steps} steps," in grid_dvae_run["stdout"]

    # Two workers trained: two ranks, two processes, each its half of every global batch, all images once an epoch.
    assert len(run.data.tags["cluster.node_ids"].split(",")) == 2  # one entry per rank
    assert run.data.tags["schedule.lr_horizon_steps"] == str(total_steps)  # the cosine horizon, as the run used it
    lines = {rank: [json.loads(line) for line in (samples / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)}
    assert sorted(lines) == [0, 1] and not (samples / "rank2.jsonl").exists()
    pids = {rank: {line["pid"] for line in rows} for rank, rows in lines.items()}
    assert len(pids[0]) == len(pids[1]) == 1 and pids[0] != pids[1], pids
    for rank, rows in lines.items():
        assert [line["step"] for line in rows] == list(range(1, total_steps + 1)), rank
        assert all(len(line["keys"]) == BATCH // 2 for line in rows), rank
    for epoch in range(EPOCHS):
        keys = [k for rows in lines.values() for line in rows if line["epoch"] == epoch for k in line["keys"]]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == TRAIN_IMAGES, epoch

    metrics = run.data.metrics
    for key in ("val/psnr", "val/mse", "latent/perplexity", "latent/dead_codes", "latent/codes_used",
                "latent/code_perplexity", "latent/codebook_perplexity_soft", "train/kl_weight", "train/lr",
                "train/temperature"):
        assert key in metrics, key
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics

    # Each logged schedule value is the schedule function's at the step it was used for: a value logged
    # at step s (after s updates) is the one update s-1 trained with. Logged at step 1, then every LOG_EVERY.
    logged_steps = sorted({1} | set(range(LOG_EVERY, total_steps + 1, LOG_EVERY)))
    beta = _history(client, run_id, "train/kl_weight")
    tau = _history(client, run_id, "train/temperature")
    lr = _history(client, run_id, "train/lr")
    assert sorted(beta) == sorted(tau) == sorted(lr) == logged_steps
    for step in logged_steps:
        assert beta[step] == pytest.approx(kl_weight(step - 1, config.train), abs=1e-12), step
        assert tau[step] == pytest.approx(temperature(step - 1, config.model.latent), abs=1e-12), step
        # train/lr is the schedule's rate (the encoder's group trains at encoder_lr_scale times it)
        expected_lr = learning_rate(step - 1, config.train, total_steps)
        assert lr[step] == pytest.approx(expected_lr, rel=1e-6), step
    assert beta[logged_steps[-1]] == pytest.approx(config.train.kl_weight)  # warmed up within the run
    assert tau[logged_steps[-1]] == pytest.approx(config.model.latent.tau_min)  # annealed to its floor

    # The logged model holds the EMA weights of the final checkpoint (not the weights the optimizer trained).
    state = _final_checkpoint(grid_dvae_run["storage"])
    assert state["step"] == total_steps and "online_model" in state
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["model"]
    mlflow.set_tracking_uri(tracking_uri)
    vae = mlflow.pyfunc.load_model(models[0].model_uri).unwrap_python_model().tokenizer.model.cpu().eval()
    logged = vae.state_dict()
    assert logged.keys() == state["model"].keys()
    for name, tensor in state["model"].items():
        assert torch.equal(logged[name], tensor), name
    trained = [name for name, tensor in state["online_model"].items()
               if tensor.is_floating_point() and not torch.equal(tensor, state["model"][name])]
    assert trained, "the EMA equals the trained weights: the comparison above could not tell them apart"

    # The last epoch's reconstruction and code-use figures are those of that model on the val split,
    # recomputed here from the pixels: PSNR (peak 1) and MSE per image, argmax codes over all positions.
    manifest = read_manifest(dataset)
    target = ImageTarget.from_config(manifest.spec, config.data)
    mse, psnr, codes = [], [], []
    with torch.no_grad():
        for images, _ in eval_batches(manifest, dataset, split="val", rank=0, world_size=1, batch_size=16,
                                      decoder=SampleDecoder(manifest.spec, target)):
            x = images.float() / 255
            error = (vae.reconstruct(x) - x).pow(2).flatten(1).mean(1).double()
            mse += error.tolist()
            psnr += (10 * torch.log10(1 / error)).tolist()
            codes.append(vae.encode(vae.prepare(x)[0]).reshape(len(x), -1, 32).argmax(-1).flatten())
    assert len(mse) == 10  # the val split
    counts = np.bincount(torch.cat(codes).numpy(), minlength=32)
    p = counts[counts > 0] / counts.sum()
    final = {key: _history(client, run_id, key)[total_steps] for key in
             ("val/mse", "val/psnr", "latent/codes_used", "latent/dead_codes", "latent/code_perplexity")}
    assert final["val/mse"] == pytest.approx(np.mean(mse), rel=1e-4)
    assert final["val/psnr"] == pytest.approx(np.mean(psnr), rel=1e-4)
    assert final["latent/codes_used"] == pytest.approx((counts > 0).mean())
    assert final["latent/dead_codes"] == pytest.approx((counts == 0).mean())
    assert final["latent/code_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)

    val_steps = sorted(m.step for m in client.get_metric_history(run_id, "val/loss"))
    assert val_steps == [total_steps // EPOCHS * (e + 1) for e in range(EPOCHS)]
    restarts = _history(client, run_id, "latent/codes_restarted")  # as shipped: dead codes restart each epoch
    assert sorted(restarts) == val_steps and list(restarts.values()) == sorted(restarts.values())
    stepped = [a.path for a in client.list_artifacts(run_id, "images")]
    for key in ("reconstructions", "kl_heatmap", "code_usage"):  # one image per epoch, at the epoch's step
        steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in stepped
                       if p.startswith(f"images/{key}+step+") and p.endswith(".png"))
        assert steps == val_steps, (key, steps, stepped)
