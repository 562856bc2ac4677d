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
    model = build_vae(cfg, image_shape=(4, 5))  # grey 4x5 images, Bernoulli likelihood without binarization
    x = (torch.rand(7, 1, 4, 5) < 0.5).to(torch.uint8) * 255  # the loader's uint8 [B, C, H, W] batches
    out = model(x, temperature=0.7)
    latent = model.latent
    assert out.decoded.shape == (7, 1, 4, 5)
    assert out.params.shape == (7, latent.param_size) and out.params.requires_grad
    assert out.z.shape == (7, latent.code_size)
    assert out.kl_per_variable.shape == (latent.num_kl_terms,)
    assert out.recon_per_sample.shape == (7,) and out.kl_per_sample.shape == (7,)
    assert out.loss.ndim == 0
    torch.testing.assert_close(out.loss, out.recon + out.kl)
    torch.testing.assert_close(out.kl, out.kl_per_variable.sum())

    # Bernoulli NLL by hand: -sum_d [x log p + (1-x) log(1-p)] over the pixels x = level / 255, averaged over the batch.
    unit = x.float().div(255).flatten(1)
    log_p, log_1mp = F.logsigmoid(out.decoded.flatten(1)), F.logsigmoid(-out.decoded.flatten(1))
    by_hand = -(unit * log_p + (1 - unit) * log_1mp).sum(-1)
    torch.testing.assert_close(out.recon_per_sample, by_hand)
    torch.testing.assert_close(out.recon, by_hand.mean())
    # Floats in [0, 1] (of any layout with C*H*W values per sample) are the same images to the model.
    torch.manual_seed(5)
    as_floats = model(unit, temperature=0.7)
    torch.manual_seed(5)
    torch.testing.assert_close(as_floats.recon_per_sample, model(x, temperature=0.7).recon_per_sample)

    assert model.sample(3, generator=torch.Generator().manual_seed(1)).shape == (3, 1, 4, 5)
    recon = model.reconstruct(x)
    assert recon.shape == (7, 1, 4, 5) and ((recon >= 0) & (recon <= 1)).all()


def test_encoder_and_decoder_mirror_hidden_widths() -> None:
    model = VAE((1, 3, 4), [10, 6], build_latent(LatentConfig(variables=2, categories=3)))
    enc = [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)]
    dec = [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert enc == [10, 6, 6] and dec == [6, 10, 12]
    assert model.decoder[0].in_features == 6


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_training_reduces_loss_on_fixed_batch(kind: str) -> None:
    model = VAE((1, 1, 32), [64], build_latent(LatentConfig(kind=kind, variables=8, categories=4)))
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


# ================================================================ issue 3: complete latent families

from pathlib import Path  # noqa: E402

from torch.distributions.relaxed_categorical import ExpRelaxedCategorical  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.models import (  # noqa: E402
    MixtureLatent,
    active_units,
    discrete_elbo,
    exact_log_px_and_elbo,
    importance_log_px,
    log_importance_weights,
)
from pipeline.models.latents import exp_concrete_log_density  # noqa: E402

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_learned_prior_kl_matches_torch_distributions() -> None:
    n_vars, n_cats = 3, 5
    latent = CategoricalLatent(n_vars, n_cats, prior="learned")
    with torch.no_grad():
        latent.prior_logits.copy_(torch.randn(n_vars, n_cats) * 2)
    logits = torch.randn(6, n_vars * n_cats) * 2
    expected = kl_divergence(Categorical(logits=logits.reshape(6, n_vars, n_cats)), Categorical(logits=latent.prior_logits))
    torch.testing.assert_close(latent.kl(logits), expected, rtol=1e-5, atol=1e-6)
    # The learned prior is trained through the KL: it gets a gradient.
    latent.kl(logits).sum().backward()
    assert latent.prior_logits.grad is not None and latent.prior_logits.grad.abs().sum() > 0
    # Prior scoring and sampling follow the learned logits.
    z = latent.sample_prior(4000, generator=torch.Generator().manual_seed(0))
    freq = z.reshape(4000, n_vars, n_cats).mean(0)
    torch.testing.assert_close(freq, F.softmax(latent.prior_logits.detach(), -1), atol=0.04, rtol=0)
    expected_lp = OneHotCategorical(logits=latent.prior_logits).log_prob(z.reshape(4000, n_vars, n_cats)).sum(-1)
    torch.testing.assert_close(latent.prior_log_prob(z), expected_lp.detach())


def test_learned_prior_starts_uniform_and_limits_hold() -> None:
    latent = CategoricalLatent(2, 4, prior="learned")
    torch.testing.assert_close(latent.kl(torch.zeros(1, 8)), torch.zeros(1, 2), atol=1e-6, rtol=0)
    peaked = torch.full((1, 2, 4), -1e4)
    peaked[..., 1] = 1e4
    torch.testing.assert_close(latent.kl(peaked.reshape(1, 8)), torch.full((1, 2), math.log(4)))


def test_mixture_kl_terms_match_torch_distributions() -> None:
    dim, comps, batch = 4, 3, 5
    latent = MixtureLatent(dim, comps, prior="learned")
    with torch.no_grad():
        latent.prior_logits.copy_(torch.randn(comps))
        latent.prior_logvars.copy_(torch.randn(comps, dim) * 0.5)
    y_logits, mu, logvar = torch.randn(batch, comps), torch.randn(batch, dim), torch.randn(batch, dim)
    kl = latent.kl(torch.cat([y_logits, mu, logvar], -1))
    assert kl.shape == (batch, 2)  # index 0: y, index 1: z
    kl_y = kl_divergence(Categorical(logits=y_logits), Categorical(logits=latent.prior_logits))
    q = Normal(mu[:, None], torch.exp(0.5 * logvar[:, None]))
    p = Normal(latent.prior_means, torch.exp(0.5 * latent.prior_logvars))
    kl_z = (F.softmax(y_logits, -1) * kl_divergence(q, p).sum(-1)).sum(-1)
    torch.testing.assert_close(kl[:, 0], kl_y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl[:, 1], kl_z.detach(), rtol=1e-5, atol=1e-5)


def test_exp_concrete_density_matches_torch() -> None:
    logits = torch.randn(7, 5) * 2
    for tau in (0.1, 0.5, 2.0):
        dist = ExpRelaxedCategorical(torch.tensor(tau), logits=logits)
        y = dist.sample()
        torch.testing.assert_close(exp_concrete_log_density(y, F.log_softmax(logits, -1), tau), dist.log_prob(y),
                                   rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("prior", ["uniform", "learned"])
@pytest.mark.parametrize("prior_tau", [None, 0.5])
def test_relaxed_kl_estimate_is_unbiased(prior: str, prior_tau: float | None) -> None:
    n_cats, tau, draws = 4, 0.66, 40_000
    latent = CategoricalLatent(1, n_cats, prior=prior, kl="relaxed", prior_tau=prior_tau)
    if latent.prior_logits is not None:
        with torch.no_grad():
            latent.prior_logits.copy_(torch.tensor([0.5, -0.2, 0.1, -1.0]))
    logits = torch.tensor([[2.0, -1.0, 0.3, 0.0]])
    _, kl = latent.sample_and_kl(logits.expand(draws, n_cats), tau)
    ours, ours_se = kl.mean().item(), kl.std().item() / math.sqrt(draws)
    # Reference: a high-sample Monte Carlo estimate with torch's own ExpConcrete densities.
    q = ExpRelaxedCategorical(torch.tensor(tau), logits=logits[0])
    p = ExpRelaxedCategorical(torch.tensor(prior_tau or tau), logits=latent.log_prior().detach()[0])
    y = q.sample((400_000,))
    ref_terms = q.log_prob(y) - p.log_prob(y)
    ref, ref_se = ref_terms.mean().item(), ref_terms.std().item() / math.sqrt(len(y))
    assert abs(ours - ref) < 4 * math.hypot(ours_se, ref_se), (ours, ref, ours_se, ref_se)


def _extreme_params(latent, batch: int = 4) -> torch.Tensor:
    """Saturated encoder outputs: +-1e4 everywhere; logits (categorical, mixture's y) also +-1e30."""
    params = torch.randn(batch, latent.param_size) * 3
    params[:, 0] = 1e4
    params[:, 1] = -1e4
    params[2, :] = 1e4
    params[3, 1::2] = -1e4
    logits = latent.param_size if isinstance(latent, CategoricalLatent) else getattr(latent, "components", 0)
    params[0, :logits] = 1e30
    params[1, 2:logits] = -1e30
    return params


LATENT_VARIANTS = [
    dict(kind="categorical", estimator=estimator, prior=prior, kl=kl)
    for estimator in ("gumbel-softmax", "straight-through") for prior in ("uniform", "learned")
    for kl in ("analytic", "relaxed")
] + [dict(kind="categorical", kl="relaxed", prior_tau=0.5), dict(kind="gaussian"), dict(kind="mixture"),
     dict(kind="mixture", prior="learned")]


@pytest.mark.parametrize("options", LATENT_VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_loss_and_gradients_finite_at_tau_0_1_with_extreme_params(options: dict) -> None:
    latent = build_latent(LatentConfig(variables=4, categories=5, **options))
    for _ in range(10):
        params = _extreme_params(latent).requires_grad_(True)
        z, kl = latent.sample_and_kl(params, 0.1)
        assert torch.isfinite(z).all() and torch.isfinite(kl).all()
        loss = (z * torch.randn_like(z)).sum() + kl.sum()
        loss.backward()
        assert torch.isfinite(params.grad).all()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in latent.parameters())
        # The evaluation path too: un-relaxed samples scored under posterior and prior.
        with torch.no_grad():
            codes = latent.sample_posterior(params, 3)
            assert torch.isfinite(latent.log_prob(params, codes)).all()
            assert torch.isfinite(latent.prior_log_prob(codes)).all()


@pytest.mark.parametrize("options", LATENT_VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_vae_loss_finite_at_tau_0_1_with_saturated_encoder(options: dict) -> None:
    cfg = ModelConfig(hidden=[16], latent=LatentConfig(variables=3, categories=4, **options))
    model = build_vae(cfg, input_dim=12)
    with torch.no_grad():
        model.encoder[-1].weight.mul_(1e4)  # posterior logits in the 1e4 range
    x = torch.rand(8, 12).bernoulli()
    out = model(x, temperature=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- likelihood: exact vs estimates

def _tiny_model(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    model = build_vae(ModelConfig(hidden=[8], latent=LatentConfig(variables=2, categories=3)), input_dim=6)
    with torch.no_grad():  # sharper than at init, so q and p(z|x) differ visibly (gaps of 0.1-0.5 nats)
        for p in model.parameters():
            p.mul_(2)
    return model.eval()


def _log_weights(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """log w [k, B] for k proposals per input: the model prepares x (its likelihood's inputs and targets)."""
    inputs, target = model.prepare(x)
    return log_importance_weights(model, target, model.encode(inputs), k)


def test_exact_enumeration_matches_brute_force() -> None:
    model = _tiny_model()
    x = torch.rand(4, 6).bernoulli()
    log_px, elbo = exact_log_px_and_elbo(model, x)
    codes = model.latent.enumerate_codes(100)
    assert codes.shape == (9, 6) and torch.equal(codes.reshape(9, 2, 3).sum(-1), torch.ones(9, 2))
    params = model.encode(x)
    with torch.no_grad():
        joint = torch.stack([
            -F.binary_cross_entropy_with_logits(model.decode(c[None].expand(4, -1)).flatten(1), x, reduction="none").sum(-1)
            + model.latent.prior_log_prob(c[None]) for c in codes])  # [9, B]
        log_q = torch.stack([model.latent.log_prob(params, c[None].expand(4, -1)) for c in codes])
    torch.testing.assert_close(log_px, torch.logsumexp(joint, 0))
    torch.testing.assert_close(elbo, (log_q.exp() * (joint - log_q)).sum(0))
    assert (elbo <= log_px + 1e-5).all()
    assert model.latent.enumerate_codes(8) is None  # 3^2 = 9 > 8


def test_importance_estimate_converges_to_exact_and_bounds_are_ordered() -> None:
    model = _tiny_model()
    x = torch.rand(5, 6).bernoulli()
    log_px, elbo = exact_log_px_and_elbo(model, x)
    torch.manual_seed(1)
    estimate = importance_log_px(model, x, 20_000)
    # Tolerance from the spread of the weights: relative standard error of the p(x) estimate ~0.011 here.
    rel_se = (_log_weights(model, x, 20_000) - log_px).exp().std(0) / math.sqrt(20_000)
    assert ((estimate - log_px).abs() < 4 * rel_se).all(), (estimate, log_px, rel_se)
    assert (log_px - elbo > 0.05).all()  # the test would be vacuous if q were the exact posterior
    # E[L_k] over repetitions: ELBO = E[L_1] <= E[L_k] <= E[L_k'] (k <= k') <= log p(x).
    reps, ks = 4000, [1, 2, 5, 20, 100]
    log_w = _log_weights(model, x.repeat(reps, 1), max(ks)).reshape(max(ks), reps, 5)
    bounds = [(torch.logsumexp(log_w[:k], 0) - math.log(k)).mean(0) for k in ks]  # each [B]
    torch.testing.assert_close(bounds[0], elbo, atol=0.05, rtol=0)
    for lower, upper in zip(bounds, bounds[1:]):
        assert (lower <= upper + 1e-3).all()
    assert (bounds[-1] <= log_px + 1e-3).all()
    assert (elbo <= bounds[-1]).all()
    # The discrete one-sample ELBO is an unbiased estimate of the exact ELBO.
    recon, kl = discrete_elbo(model, x.repeat(reps, 1))
    torch.testing.assert_close((recon - kl).reshape(reps, 5).mean(0), elbo, atol=0.05, rtol=0)


@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_importance_weights_agree_with_elbo_for_continuous_latents(kind: str) -> None:
    torch.manual_seed(0)
    model = build_vae(ModelConfig(hidden=[16], latent=LatentConfig(kind=kind, variables=2, categories=3)), 10).eval()
    x = torch.rand(3, 10).bernoulli()
    reps = 20_000
    # E_q[log w] is the ELBO: the mean log-weight matches reconstruction minus the analytic KL.
    log_w = _log_weights(model, x, reps)
    recon, kl = discrete_elbo(model, x.repeat(reps, 1))
    torch.testing.assert_close(log_w.mean(0), (recon - kl).reshape(reps, 3).mean(0), atol=0.05, rtol=0)
    assert (importance_log_px(model, x, 2000) >= log_w.mean(0) - 1e-3).all()
    assert model.latent.enumerate_codes(10**9) is None


# ---------------------------------------------------------------- monitoring helpers

def test_active_units_counts_units_with_posterior_mean_variance() -> None:
    means = torch.zeros(100, 4)
    means[:, 0] = torch.linspace(-1, 1, 100)  # variance ~0.34: active
    means[:, 1] = 0.05 * torch.linspace(-1, 1, 100)  # variance ~0.0009: inactive
    means[:, 3] = 3.0  # constant: inactive
    assert active_units(means.sum(0), means.pow(2).sum(0), 100, unit_size=1) == 1
    # Units of 2 entries (a categorical variable of 2 classes): the variances add up.
    assert active_units(means.sum(0), means.pow(2).sum(0), 100, unit_size=2) == 1
    assert active_units(torch.zeros(4), torch.zeros(4), 0, unit_size=1) == 0


def test_mixture_cluster_and_usage() -> None:
    latent = MixtureLatent(2, 3)
    params = torch.tensor([[5.0, 0, 0, 0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0, 0]])
    assert latent.cluster(params).tolist() == [0, 2]
    assert latent.usage(params).shape == (1, 3)
    assert latent.decoder_size == 2 and latent.code_size == 5
    assert CategoricalLatent(2, 3).cluster(torch.zeros(1, 6)) is None


# ---------------------------------------------------------------- architectures and shipped configs

@pytest.mark.parametrize("shape", [(28, 28), (8, 8), (5, 7), (3, 9, 6)])
@pytest.mark.parametrize("kind", ["categorical", "gaussian", "mixture"])
def test_conv_vae_shapes_and_gradients(shape: tuple[int, ...], kind: str) -> None:
    cfg = ModelConfig(arch="conv", hidden=[32], channels=[4, 8], latent=LatentConfig(kind=kind, variables=3, categories=4))
    model = build_vae(cfg, image_shape=shape, binarize="dynamic")
    full = shape if len(shape) == 3 else (1, *shape)  # (H, W) means one grey channel
    assert model.image_shape == full and model.dims == math.prod(full)
    x = torch.randint(0, 256, (5, *full), dtype=torch.uint8)
    out = model(x, temperature=0.5)
    assert out.decoded.shape == (5, *full)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())
    assert model.sample(2).shape == (2, *full) and model.reconstruct(x).shape == (5, *full)


def test_conv_without_image_shape_assumes_square_and_refuses_otherwise() -> None:
    cfg = ModelConfig(arch="conv", hidden=[16], channels=[4], latent=LatentConfig(variables=2, categories=3))
    assert build_vae(cfg, input_dim=64).encoder.image_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="square"):
        build_vae(cfg, input_dim=60)


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_each_shipped_config_trains_a_few_steps(config_path: Path) -> None:
    cfg = load_config(config_path)
    if cfg.data.image_size and max(cfg.data.image_size) > 64:
        # A GPU-cluster config (e.g. DALL-E's 256x256, 2048 channels: ~45 s a step here): its architecture,
        # latent and likelihood, at CPU-test widths and the smallest image its downsampling allows.
        side = 2 * cfg.model.downsample
        cfg = load_config(config_path, [f"data.image_size=[{side},{side}]",
                                        f"model.channels=[{','.join(str(8 << i) for i in range(len(cfg.model.channels)))}]"])
    size = cfg.data.image_size or ((8, 8) if "digits" in config_path.stem else (28, 28))
    shape = (cfg.data.channels or 1, *size)
    model = build_vae(cfg.model, image_shape=shape, binarize=cfg.model.binarize)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    x = (torch.rand(32, *shape) < 0.2).to(torch.uint8) * 255  # 0/255: every binarization gives the same images
    losses = []
    for step in range(5):
        latent = cfg.model.latent
        exponential = latent.tau_exponential
        tau = temperature_at(step, latent.tau0, latent.tau_min, exponential.rate, exponential.every)
        out = model(x, temperature=tau)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_activation_option_reaches_every_hidden_layer() -> None:
    cfg = ModelConfig(hidden=[16, 8], activation="tanh", latent=LatentConfig(kind="gaussian", variables=4))
    model = build_vae(cfg, input_dim=20)
    kinds = {type(m) for m in [*model.encoder, *model.decoder] if not isinstance(m, torch.nn.Linear)}
    assert kinds == {torch.nn.Tanh}
