"""The tokenizer report (pipeline/evaluate/tokenizer_report.py), the K-means patch quantizer beside it
(`pipeline bench tokenizer`), and the report `pipeline evaluate` logs for a grid model. Real photo
tiles (`pipeline data photos`), a real sqlite MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.bench.tokenizer import fit_kmeans, from_patches, kmeans_encode, kmeans_report, to_patches
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.evaluate.tokenizer_report import (PSNR_CAP_DB, TokenizerTally, model_report, rate_bits,
                                                tokenizer_figures, unigram_bits_per_token)

REPO = Path(__file__).resolve().parents[1]
DVAE_CONFIG = REPO / "configs" / "images-dvae.yaml"


# ---------------------------------------------------------------- the figures on constructed cases

def test_report_figures_on_constructed_codes_and_images() -> None:
    # Two 1x4x4 images on a 2x2 grid of K = 4 codes: counts [4, 2, 1, 1]
    codes = torch.tensor([[[0, 1], [2, 3]], [[0, 0], [0, 1]]])
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    recon = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.01)])  # MSE 0.01 and 1e-4
    train_counts = np.array([6, 2, 0, 0])
    f = tokenizer_figures(codes, images, recon, categories=4, train_counts=train_counts)
    assert f.images == 2 and f.rate_bits_per_image == 8.0 == rate_bits((2, 2), 4)  # 2 * 2 * log2 4
    assert f.psnr == pytest.approx((20.0 + 40.0) / 2, rel=1e-6)  # mean over images
    assert f.mse == pytest.approx((0.01 + 1e-4) / 2, rel=1e-6)
    assert f.psnr_pooled == pytest.approx(10 * math.log10(2 / 0.0101), rel=1e-6)
    assert f.codes_used == 1.0
    assert f.code_perplexity == pytest.approx(2 ** 1.75, rel=1e-12)  # p = 1/2, 1/4, 1/8, 1/8: 1.75 bits
    # add-one smoothing: p = (6+1, 2+1, 0+1, 0+1) / (8 + 4)
    expected = -(4 * math.log2(7 / 12) + 2 * math.log2(3 / 12) + 2 * math.log2(1 / 12)) / 8
    assert f.bits_per_token == pytest.approx(expected, rel=1e-12)
    # SSIM of flat images: only the luminance term, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = 0.01^2
    c1 = 1e-4
    assert f.ssim == pytest.approx((c1 / (0.01 + c1) + c1 / (1e-4 + c1)) / 2, rel=1e-4)
    assert set(f.metrics("eval/val")) == {"eval/val/rate_bits_per_image", "eval/val/psnr", "eval/val/psnr_pooled",
                                          "eval/val/mse", "eval/val/ssim", "eval/val/codes_used",
                                          "eval/val/code_perplexity", "eval/val/bits_per_token"}


def test_bits_per_token_of_a_split_under_its_own_uniform_histogram_is_log2_k() -> None:
    counts = np.full(8, 5)
    assert unigram_bits_per_token(counts, counts) == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(ValueError, match="8 codes, this split's 4"):
        unigram_bits_per_token(counts, np.ones(4))


def test_batches_add_up_to_the_whole_split() -> None:
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (10, 2, 2), generator=generator)
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=generator, dtype=torch.uint8)
    recon = torch.rand(10, 3, 8, 8, generator=generator)
    whole = tokenizer_figures(codes, images, recon, categories=16, train_counts=np.arange(16))
    tally = TokenizerTally((2, 2), 16)
    for part in (slice(0, 3), slice(3, 10)):
        tally.add(codes[part], images[part], recon[part])
    parts = tally.figures(np.arange(16))
    for name in ("psnr", "psnr_pooled", "mse", "ssim", "codes_used", "code_perplexity", "bits_per_token"):
        assert getattr(parts, name) == pytest.approx(getattr(whole, name), rel=1e-9), name
    with pytest.raises(ValueError, match=r"\[B, 2, 2\]"):
        tally.add(torch.zeros(10, 3, dtype=torch.long), images, recon)


def test_a_perfect_reconstruction_is_capped_like_validation() -> None:
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    f = tokenizer_figures(torch.zeros(3, 2, 2, dtype=torch.long), images, images, categories=4)
    assert f.psnr == f.psnr_pooled == PSNR_CAP_DB == 100.0 and f.ssim == pytest.approx(1.0)
    assert f.codes_used == 0.25 and f.code_perplexity == 1.0 and f.bits_per_token is None


# ---------------------------------------------------------------- the K-means baseline on a constructed case

def _tiled(patches: np.ndarray, layout: np.ndarray) -> torch.Tensor:
    """Images [N, 3, 8, 8] whose 2x2 grid positions hold patches[layout[n, i, j]] (each 3x4x4 uint8)."""
    n = len(layout)
    out = np.zeros((n, 3, 8, 8), dtype=np.uint8)
    for index in np.ndindex(*layout.shape):
        b, i, j = index
        out[b, :, 4 * i: 4 * i + 4, 4 * j: 4 * j + 4] = patches[layout[index]]
    return torch.from_numpy(out)


def test_kmeans_codes_images_made_of_known_patches_exactly() -> None:
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)  # 5 distinct patches, K = 5
    train = _tiled(patches, rng.integers(0, 5, (40, 2, 2)))
    held_out = _tiled(patches, rng.integers(0, 5, (12, 2, 2)))
    assert torch.equal(from_patches(to_patches(train, (2, 2)), (2, 2), (3, 8, 8)), train.float() / 255)

    kmeans = fit_kmeans([train[:25], train[25:]], (2, 2), 5, seed=0)
    splits = {"train": [(train[:25], None), (train[25:], None)], "val": [(held_out, None)]}
    report = kmeans_report(kmeans, lambda name: splits[name], ["train", "val"], (2, 2), 5)
    for name, f in report.items():
        assert f.psnr == f.psnr_pooled == PSNR_CAP_DB, name  # every patch is a centre: coded exactly
        assert f.ssim == pytest.approx(1.0) and f.codes_used == 1.0 and f.rate_bits_per_image == 4 * math.log2(5)
    # one code per distinct patch, wherever it sits: image i holds patch i at all 4 positions
    codes, recon = kmeans_encode(kmeans, _tiled(patches, np.arange(5)[:, None, None].repeat(2, 1).repeat(2, 2)), (2, 2))
    assert all(len(set(grid.flatten().tolist())) == 1 for grid in codes)
    assert sorted(codes[:, 0, 0].tolist()) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- end to end on real photo tiles

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """`pipeline data photos --scale 128`: 236 / 48 / 24 real 32x32 RGB tiles."""
    out = str(tmp_path_factory.mktemp("photos") / "photos128")
    result = CliRunner().invoke(app, ["data", "photos", "--scale", "128", "--out", out])
    assert result.exit_code == 0, result.output
    return out


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_bench_tokenizer_on_photo_tiles(photos) -> None:
    cli = CliRunner()
    report = _json(cli.invoke(app, ["bench", "tokenizer", "--data", photos, "--grid", "8", "8", "--codes", "32",
                                    "--json"]))
    assert report["grid"] == [8, 8] and report["codes"] == 32 and report["patch"] == [4, 4]
    train, val = report["kmeans"]["train"], report["kmeans"]["val"]
    assert (train["images"], val["images"]) == (236, 48)
    assert train["rate_bits_per_image"] == val["rate_bits_per_image"] == 8 * 8 * 5
    assert train["codes_used"] == 1.0 and 0 < val["codes_used"] <= 1
    assert 15 < val["psnr"] < 40 and 0 < val["ssim"] < 1 and 1 < val["code_perplexity"] <= 32
    assert 0 < val["bits_per_token"] and val["log2_codes"] == 5

    text = cli.invoke(app, ["bench", "tokenizer", "--data", photos, "--grid", "8", "8", "--codes", "32",
                            "--split", "test"])
    assert text.exit_code == 0, text.output
    assert "K-means, train" in text.stdout and "K-means, test" in text.stdout and "320 bits/image" in text.stdout
    bad = cli.invoke(app, ["bench", "tokenizer", "--data", photos, "--grid", "8", "8", "--codes", "32",
                           "--split", "holdout"])
    assert bad.exit_code == 1 and "has no split 'holdout'" in bad.output
    uneven = cli.invoke(app, ["bench", "tokenizer", "--data", photos, "--grid", "5", "5", "--codes", "32"])
    assert uneven.exit_code == 1 and "32x32 images cannot be cut into a 5x5 grid" in uneven.output


def _grid_run(photos: str, tracking_uri: str, tmp_path: Path) -> str:
    """A run as `pipeline train` logs it (resolved config.yaml, checkpoint/model.pt): the images-dvae
    config at test widths (8x8 grid of 16 codes), trained 3 plain steps on the photo tiles."""
    from pipeline.data import eval_batches, read_manifest
    from pipeline.models import build_vae
    from pipeline.runs import store

    config = load_config(DVAE_CONFIG, [f"data.url={photos}", f"tracking.uri={tracking_uri}",
                                       "model.channels=[8]", "model.codebook_dim=48",
                                       "model.latent.categories=16"])
    manifest = read_manifest(photos)
    torch.manual_seed(0)
    model = build_vae(config.model, image_shape=(3, 32, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step, (x, _) in enumerate(eval_batches(manifest, photos, split="train", rank=0, world_size=1, batch_size=32)):
        if step == 3:
            break
        optimizer.zero_grad()
        model(x).loss.backward()
        optimizer.step()
    run_id = store.start_run(config, tracking_uri=tracking_uri, manifest_digest=manifest.digest())
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    store.log_artifact_files(tracking_uri, run_id, [weights], artifact_path="checkpoint")
    return run_id


@pytest.mark.timeout(300)
def test_evaluate_logs_the_tokenizer_report_of_a_grid_run(photos, tracking_uri, tmp_path) -> None:
    run_id = _grid_run(photos, tracking_uri, tmp_path)
    cli = CliRunner()
    figures = _json(cli.invoke(app, ["evaluate", run_id, "-k", "2", "--split", "val", "--json",
                                     "--tracking-uri", tracking_uri]))
    names = {f"eval/val/{name}" for name in ("rate_bits_per_image", "psnr", "psnr_pooled", "mse", "ssim",
                                               "codes_used", "code_perplexity", "bits_per_token")}
    logged = MlflowClient(tracking_uri).get_run(run_id).data.metrics
    assert names <= set(figures["metrics"]) and names <= set(logged)
    assert logged["eval/val/rate_bits_per_image"] == 8 * 8 * math.log2(16) == 256.0
    assert 0 < logged["eval/val/codes_used"] <= 1 and 1 <= logged["eval/val/code_perplexity"] <= 16
    assert 0 < logged["eval/val/ssim"] <= 1 and logged["eval/val/psnr"] > 0
    report = figures["tokenizer"][f"val (run {run_id[:8]})"]
    assert report["images"] == 48 and report["log2_codes"] == 4

    # The same figures from the report function on the model itself, and from the bench beside K-means
    from pipeline.evaluate.likelihood import open_run

    opened = open_run(run_id, tracking_uri=tracking_uri)
    direct = model_report(opened.model, lambda split: opened.batches(split, 17), ["val"])["val"]
    for name, value in direct.metrics("eval/val").items():
        assert logged[name] == pytest.approx(value, rel=1e-6), name  # float32 SSIM, two passes
    bench = _json(cli.invoke(app, ["bench", "tokenizer", "--data", photos, "--run", run_id, "--json",
                                   "--tracking-uri", tracking_uri]))
    assert bench["grid"] == [8, 8] and bench["codes"] == 16
    assert bench["run"]["val"]["psnr"] == pytest.approx(logged["eval/val/psnr"], rel=1e-9)
    assert bench["run"]["val"]["rate_bits_per_image"] == bench["kmeans"]["val"]["rate_bits_per_image"] == 256.0
    mismatch = cli.invoke(app, ["bench", "tokenizer", "--data", photos, "--run", run_id, "--codes", "512",
                                "--tracking-uri", tracking_uri])
    assert mismatch.exit_code == 1 and "grid of 16 codes" in mismatch.output

    # plain text: every figure by name, then the report as a table
    text = cli.invoke(app, ["evaluate", run_id, "-k", "2", "--tracking-uri", tracking_uri])
    assert text.exit_code == 0, text.output
    assert "test/rate_bits_per_image: 256.0000" in text.stdout and "test/bits_per_token:" in text.stdout
    assert "tokenizer report" in text.stdout and "PSNR pooled" in text.stdout
    assert "test/codes_used" in MlflowClient(tracking_uri).get_run(run_id).data.metrics
