"""Latent families, temperature schedule and the VAE loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Normal, OneHotCategorical, kl_divergence

from pipeline.config import LatentConfig, ModelConfig
from pipeline.models import (
    VAE,
    CategoricalLatent,
    GaussianLatent,
    build_latent,
    build_vae,
    perplexity_from_usage,
    temperature_at,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- KL

def test_categorical_kl_matches_torch_distributions_and_entropy() -> None:
    n_vars, n_cats, batch = 5, 7, 8
    latent = CategoricalLatent(n_vars, n_cats)
    logits = torch.randn(batch, n_vars * n_cats) * 3
    kl = latent.kl(logits)
    assert kl.shape == (batch, n_vars)

    per_var_logits = logits.reshape(batch, n_vars, n_cats)
    uniform = Categorical(logits=torch.zeros(n_cats))
    expected = kl_divergence(Categorical(logits=per_var_logits), uniform)
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-6)

    entropy = Categorical(logits=per_var_logits).entropy()
    torch.testing.assert_close(kl, math.log(n_cats) - entropy, rtol=1e-5, atol=1e-6)
    assert (kl >= -1e-6).all()


def test_categorical_kl_limits_uniform_zero_and_peaked_log_k() -> None:
    latent = CategoricalLatent(2, 10)
    uniform_kl = latent.kl(torch.zeros(1, 20))
    torch.testing.assert_close(uniform_kl, torch.zeros(1, 2), atol=1e-6, rtol=0)
    peaked = torch.full((1, 2, 10), -1e4)
    peaked[..., 3] = 1e4
    torch.testing.assert_close(latent.kl(peaked.reshape(1, 20)), torch.full((1, 2), math.log(10)))


def test_gaussian_kl_matches_torch_distributions() -> None:
    dim, batch = 6, 9
    latent = GaussianLatent(dim)
    mu, logvar = torch.randn(batch, dim), torch.randn(batch, dim)
    kl = latent.kl(torch.cat([mu, logvar], dim=-1))
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    assert kl.shape == (batch, dim)
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- log probabilities

def test_categorical_log_prob_matches_one_hot_categorical() -> None:
    n_vars, n_cats, batch = 4, 6, 10
    latent = CategoricalLatent(n_vars, n_cats)
    logits = torch.randn(batch, n_vars * n_cats) * 2
    posterior = OneHotCategorical(logits=logits.reshape(batch, n_vars, n_cats))
    z = posterior.sample()
    expected = posterior.log_prob(z).sum(-1)
    torch.testing.assert_close(latent.log_prob(logits, z.reshape(batch, -1)), expected)

    prior_z = latent.sample_prior(batch)
    assert prior_z.shape == (batch, n_vars * n_cats)
    assert torch.equal(prior_z.reshape(batch, n_vars, n_cats).sum(-1), torch.ones(batch, n_vars))
    torch.testing.assert_close(latent.prior_log_prob(prior_z), torch.full((batch,), -n_vars * math.log(n_cats)))


def test_gaussian_log_prob_matches_normal() -> None:
    latent = GaussianLatent(3)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    z = torch.randn(5, 3)
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(latent.log_prob(torch.cat([mu, logvar], -1), z), expected)
    torch.testing.assert_close(latent.prior_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_sample_prior_is_reproducible_with_generator() -> None:
    latent = CategoricalLatent(3, 5)
    first = latent.sample_prior(16, generator=torch.Generator().manual_seed(7))
    second = latent.sample_prior(16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


# ---------------------------------------------------------------- temperature schedule

def test_temperature_schedule() -> None:
    tau0, tau_min, rate, every = 1.0, 0.5, 1e-3, 100
    assert temperature_at(0, tau0, tau_min, rate, every) == tau0
    # Staircase: constant within a block of `every` steps, drops at the boundary.
    assert temperature_at(99, tau0, tau_min, rate, every) == tau0
    assert temperature_at(100, tau0, tau_min, rate, every) < tau0
    assert temperature_at(150, tau0, tau_min, rate, every) == temperature_at(100, tau0, tau_min, rate, every)
    assert temperature_at(250, tau0, tau_min, rate, every) == pytest.approx(tau0 * math.exp(-rate * 200))
    # Floor: far along, the value is tau_min, never below.
    assert temperature_at(10**7, tau0, tau_min, rate, every) == tau_min
    values = [temperature_at(s, tau0, tau_min, rate, every) for s in range(0, 2000, 37)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) >= tau_min


# ---------------------------------------------------------------- Gumbel-Softmax numerics

def _extreme_logits(n_vars: int, n_cats: int) -> torch.Tensor:
    logits = torch.randn(4, n_vars, n_cats)
    logits[:, 0, 0] = 1e4
    logits[:, 1, :] = -1e4
    logits[:, 1, 2] = 1e4
    logits[:, 2, 1:] = -1e30
    logits[:, 3, :2] = -float("inf")  # genuinely -inf, with finite logits left in the row
    return logits.reshape(4, n_vars * n_cats)


@pytest.mark.parametrize("tau", [0.1, 0.01])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_is_finite_at_low_temperature(tau: float, hard: bool) -> None:
    n_vars, n_cats = 4, 5
    latent = CategoricalLatent(n_vars, n_cats, hard=hard)
    for _ in range(20):
        logits = _extreme_logits(n_vars, n_cats).requires_grad_(True)
        z = latent.rsample(logits, tau)
        assert torch.isfinite(z).all()
        torch.testing.assert_close(z.reshape(4, n_vars, n_cats).sum(-1), torch.ones(4, n_vars))
        loss = (z * torch.randn_like(z)).sum() + latent.kl(logits).sum() + latent.log_prob(logits, z.detach()).sum()
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_hard_gumbel_softmax_is_exactly_one_hot_with_gradient() -> None:
    n_vars, n_cats = 3, 4
    latent = CategoricalLatent(n_vars, n_cats, hard=True)
    logits = torch.randn(8, n_vars * n_cats, requires_grad=True)
    z = latent.rsample(logits, 0.5)
    codes = z.reshape(8, n_vars, n_cats)
    assert torch.equal(codes.sum(-1), torch.ones(8, n_vars))
    assert torch.equal(codes, (codes == 1).to(codes.dtype))  # only exact 0s and 1s
    (z * torch.randn_like(z)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_sample_approaches_one_hot_at_low_temperature() -> None:
    latent = CategoricalLatent(50, 6, hard=False)
    z = latent.rsample(torch.randn(16, 300), 0.01).reshape(16, 50, 6)
    # Most relaxed samples are near-one-hot at tau=0.01.
    assert (z.max(-1).values > 0.99).float().mean() > 0.9


# ---------------------------------------------------------------- usage / perplexity

def test_perplexity_from_usage_bounds() -> None:
    n_vars, n_cats = 3, 8
    assert perplexity_from_usage(torch.full((n_vars, n_cats), 12.5)) == pytest.approx(n_cats)
    one_hot = torch.zeros(n_vars, n_cats)
    one_hot[:, 2] = 40.0
    assert perplexity_from_usage(one_hot) == pytest.approx(1.0)
    half = torch.zeros(n_vars, n_cats)
    half[:, :2] = 1.0
    assert perplexity_from_usage(half) == pytest.approx(2.0)


def test_usage_sums_posterior_over_batch() -> None:
    latent = CategoricalLatent(2, 3)
    logits = torch.randn(5, 6)
    usage = latent.usage(logits)
    assert usage.shape == (2, 3)
    torch.testing.assert_close(usage, F.softmax(logits.reshape(5, 2, 3), -1).sum(0))
    torch.testing.assert_close(usage.sum(-1), torch.full((2,), 5.0))
    assert GaussianLatent(2).usage(torch.randn(5, 4)) is None


# ---------------------------------------------------------------- VAE

@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_vae_forward_shapes_and_loss_decomposition(kind: str) -> None:
    cfg = ModelConfig(hidden=[32, 16], latent=LatentConfig(kind=kind, variables=4, categories=5))
    model = build_vae(cfg, input_dim=20)
    x = torch.rand(7, 20).bernoulli()
    out = model(x, temperature=0.7)
    latent = model.latent
    assert out.logits.shape == (7, 20)
    assert out.params.shape == (7, latent.param_size) and out.params.requires_grad
    assert out.z.shape == (7, latent.code_size)
    assert out.kl_per_variable.shape == (latent.num_kl_terms,)
    assert out.recon_per_sample.shape == (7,) and out.kl_per_sample.shape == (7,)
    assert out.loss.ndim == 0
    torch.testing.assert_close(out.loss, out.recon + out.kl)
    torch.testing.assert_close(out.kl, out.kl_per_variable.sum())

    # Bernoulli NLL by hand: -sum_d [x log p + (1-x) log(1-p)], averaged over the batch.
    log_p, log_1mp = F.logsigmoid(out.logits), F.logsigmoid(-out.logits)
    by_hand = -(x * log_p + (1 - x) * log_1mp).sum(-1)
    torch.testing.assert_close(out.recon_per_sample, by_hand)
    torch.testing.assert_close(out.recon, by_hand.mean())

    assert model.sample(3, generator=torch.Generator().manual_seed(1)).shape == (3, 20)
    recon = model.reconstruct(x)
    assert recon.shape == (7, 20) and ((recon >= 0) & (recon <= 1)).all()


def test_encoder_and_decoder_mirror_hidden_widths() -> None:
    model = VAE(12, [10, 6], build_latent(LatentConfig(variables=2, categories=3)))
    enc = [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)]
    dec = [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert enc == [10, 6, 6] and dec == [6, 10, 12]
    assert model.decoder[0].in_features == 6


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_training_reduces_loss_on_fixed_batch(kind: str) -> None:
    model = VAE(32, [64], build_latent(LatentConfig(kind=kind, variables=8, categories=4)))
    x = (torch.rand(64, 32) < 0.3).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def averaged_loss() -> float:
        with torch.no_grad():
            return sum(model(x, temperature=0.5).loss.item() for _ in range(10)) / 10

    before = averaged_loss()
    for _ in range(50):
        optimizer.zero_grad()
        model(x, temperature=0.5).loss.backward()
        optimizer.step()
    after = averaged_loss()
    assert after < 0.9 * before
