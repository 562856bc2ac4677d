"""The grid latent against exact enumeration on a tiny grid, and its code-use metrics and pictures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import parse_config
from pipeline.data import Split, read_manifest, write_shards
from pipeline.models import build_vae, discrete_elbo, exact_log_px_and_elbo, importance_log_px
from pipeline.train.code_plots import code_use_images, kl_heatmap, usage_histogram
from pipeline.train.validate import evaluate_split


def _tiny_grid(k: int = 3, prior: str = "uniform", likelihood: str = "logit-laplace"):
    """1 x 8 x 8 images, f = 4: a 2 x 2 grid of K-way codes (K = 3: 81 codes in all)."""
    cfg = parse_config({"data": {"url": "unused"}, "model": {
        "arch": "resnet", "downsample": 4, "channels": [4, 4, 4], "blocks": 1, "codebook_dim": 4,
        "likelihood": likelihood, "latent": {"categories": k, "prior": prior}}})
    torch.manual_seed(0)
    model = build_vae(cfg.model, image_shape=(1, 8, 8)).eval()
    if prior == "learned":
        with torch.no_grad():
            model.latent.prior_logits.copy_(torch.randn_like(model.latent.prior_logits))
    return cfg, model


@pytest.mark.parametrize("prior", ["uniform", "learned"])
def test_kl_and_elbo_match_enumeration_on_a_2x2_grid(prior: str) -> None:
    _, model = _tiny_grid(prior=prior)
    latent = model.latent
    assert latent.variables == 4 and latent.categories == 3
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    codes = latent.enumerate_codes(1000)
    assert codes.shape == (81, 4 * 3)
    with torch.no_grad():
        out = model(x, temperature=0.5)
        inputs, target = model.prepare(x)
        params = model.encode(inputs)
        log_q = latent.log_prob(params, codes[:, None, :].expand(81, 5, 12))  # [81, B]
        q = log_q.exp()
        kl_enum = (q * (log_q - latent.prior_log_prob(codes)[:, None])).sum(0)
        log_px_z = torch.stack([model.likelihood.log_prob(model.decode(codes), t.unsqueeze(0)) for t in target], 1)
    torch.testing.assert_close(q.sum(0), torch.ones(5))
    torch.testing.assert_close(out.kl_per_sample, kl_enum, rtol=1e-5, atol=1e-5)  # analytic KL, summed over positions
    log_px, elbo = exact_log_px_and_elbo(model, x, limit=1000)
    torch.testing.assert_close(elbo, (q * log_px_z).sum(0) - kl_enum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(log_px, torch.logsumexp(log_px_z + latent.prior_log_prob(codes)[:, None], 0))
    assert (log_px >= elbo - 1e-4).all()


def test_importance_sampling_converges_to_the_enumerated_log_px() -> None:
    _, model = _tiny_grid(prior="learned")
    # A random decoder's p(x|z) spans ~80 nats over the 81 codes: IS would need far more than k
    # samples to find the few codes that matter. A damped output layer keeps the weights' spread
    # to a few nats; the tolerance is then 5 standard errors of the estimate, computed exactly
    # from the enumeration: Var_q(w) / p(x)^2 = sum_z p(x, z)^2 / q(z) / p(x)^2 - 1.
    with torch.no_grad():
        model.decoder.body[-1].weight.mul_(0.05)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    latent, k = model.latent, 4000
    codes = latent.enumerate_codes(1000)
    with torch.no_grad():
        inputs, target = model.prepare(x)
        params = model.encode(inputs)
        log_q = latent.log_prob(params, codes[:, None, :].expand(len(codes), 4, codes.shape[1]))  # [M, B]
        log_joint = torch.stack([model.likelihood.log_prob(model.decode(codes), t.unsqueeze(0)) for t in target], 1)
        log_joint = log_joint + latent.prior_log_prob(codes)[:, None]
    log_px, _ = exact_log_px_and_elbo(model, x, limit=1000)
    relative_variance = torch.exp(torch.logsumexp(2 * log_joint - log_q, 0) - 2 * log_px) - 1
    tolerance = 5 * (relative_variance / k).sqrt() + 1e-4
    assert (tolerance < 0.2).all()  # a meaningful check, not a loose one
    torch.manual_seed(1)
    assert ((importance_log_px(model, x, k=k) - log_px).abs() < tolerance).all()
    recon, kl = discrete_elbo(model, x)  # one-sample ELBO: finite, and its KL is the exact one
    assert torch.isfinite(recon).all() and (kl >= 0).all()


def test_relaxed_kl_and_straight_through_run_on_the_grid() -> None:
    cfg = parse_config({"data": {"url": "unused"}, "model": {
        "arch": "resnet", "downsample": 4, "channels": [4, 4, 4], "blocks": 1, "likelihood": "logistic",
        "latent": {"categories": 6, "kl": "relaxed", "estimator": "straight-through"}}})
    model = build_vae(cfg.model, image_shape=(3, 8, 8))
    out = model(torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8), temperature=0.5)
    assert torch.equal(out.z.reshape(3, 4, 6).sum(-1), torch.ones(3, 4))
    out.loss.backward()
    assert model.encoder.to_logits.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- code use in validation

def _black_and_white(root: Path, whites: int, blacks: int) -> str:
    images = np.zeros((whites + blacks, 8, 8), dtype=np.uint8)
    images[:whites] = 255
    split = Split(images=images, labels=np.zeros(len(images), dtype=np.int64))
    write_shards({"train": split, "val": split}, str(root), source="synthetic", samples_per_shard=7, progress=False)
    return str(root)


def test_dead_codes_perplexity_and_psnr_on_a_constructed_case(tmp_path) -> None:
    # K = 8 on a 2x2 grid; the encoder is replaced by a constructed one: a white image uses code
    # i*2+j at position (i, j) (codes 0..3), a black one code 0 everywhere -> codes 4..7 are dead.
    cfg, model = _tiny_grid(k=8)
    dataset = _black_and_white(tmp_path / "bw", whites=6, blacks=9)

    def constructed(inputs: torch.Tensor) -> torch.Tensor:
        white = (inputs.flatten(1).mean(1) > 0.5).long()[:, None]  # [B, 1]
        index = white * torch.arange(4)[None, :]  # [B, 4 positions]
        return (50.0 * F.one_hot(index, 8).float()).reshape(len(inputs), -1)

    model.encoder.forward = constructed
    stats: dict = {}
    metrics = evaluate_split(model, read_manifest(dataset), dataset, "val", rank=0, world_size=1, batch_size=4,
                             cfg=cfg, step=0, stats=stats)
    assert metrics["latent/dead_codes"] == 0.5 and metrics["latent/codes_used"] == 0.5
    counts = np.array([6 + 9 * 4, 6, 6, 6, 0, 0, 0, 0], dtype=float)
    np.testing.assert_array_equal(stats["code_counts"], counts)
    p = counts[counts > 0] / counts.sum()
    # Argmax and soft perplexity agree here: the constructed logits are one-hot to float precision.
    assert metrics["latent/code_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert metrics["latent/codebook_perplexity_soft"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert "latent/codebook_perplexity" not in metrics
    assert stats["grid"] == (2, 2) and stats["kl_per_variable"].shape == (4,)
    assert stats["kl_per_variable"].sum() == pytest.approx(metrics["val/kl"])
    assert "val/kl_latent_0" not in metrics  # a grid's per-position KL is a picture, not 4 (or 1024) metrics
    # val/mse and val/psnr: the posterior mode's reconstruction against the pixels, mean per image.
    images = torch.tensor(np.r_[np.full((6, 1, 8, 8), 255), np.zeros((9, 1, 8, 8))], dtype=torch.uint8)
    with torch.no_grad():
        mse = (model.reconstruct(images) - images.float() / 255).pow(2).flatten(1).mean(1).double()
    assert metrics["val/mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert metrics["val/psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-5)
    pictures = code_use_images(stats)
    assert set(pictures) == {"kl_heatmap", "code_usage"}


def test_code_use_pictures() -> None:
    heat = kl_heatmap(np.arange(32 * 32, dtype=float), (32, 32))
    assert heat.size == (256, 256 + 14) and heat.mode == "RGB"
    assert heat.getpixel((0, 14)) != heat.getpixel((255, 14 + 255))  # low and high KL in different colours
    counts = np.zeros(8192)
    counts[:500] = np.arange(500) + 1
    hist = usage_histogram(counts)
    assert hist.size == (512, 216)
    assert hist.getpixel((511, 14 + 199)) == (204, 0, 0)  # the dead classes (sorted last) marked red
    assert code_use_images({"grid": None, "kl_per_variable": np.ones(20), "code_counts": None}) == {}
