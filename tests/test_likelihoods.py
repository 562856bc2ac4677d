"""Observation models p(x|z): the discretized logistic is a proper distribution over 256 levels
whose bits/dim can be computed by hand; Bernoulli binarizes as configured."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import Bernoulli, DiscretizedLogistic, bits_per_dim, build_vae


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_logistic_probabilities_of_all_256_levels_sum_to_one() -> None:
    lik = DiscretizedLogistic()
    levels = torch.arange(256, dtype=torch.uint8).reshape(256, 1, 1, 1)
    _, target = lik.prepare(levels)
    for mu, log_s in ((0.0, -2.0), (0.7, -4.5), (-1.2, 0.3), (0.99, -7.0)):
        out = torch.tensor([mu, log_s]).reshape(1, 2, 1, 1).expand(256, 2, 1, 1)
        total = lik.log_prob(out, target).exp().sum().item()
        assert total == pytest.approx(1.0, abs=2e-4), (mu, log_s)


def test_logistic_bits_per_dim_by_hand() -> None:
    """One 1x1x2 image, levels 0 and 128, mu = 0, s = e^-1: each probability written out from the logistic CDF."""
    lik = DiscretizedLogistic()
    x = torch.tensor([0, 128], dtype=torch.uint8).reshape(1, 1, 1, 2)
    out = torch.tensor([[[[0.0, 0.0]], [[-1.0, -1.0]]]])  # mu [1,1,1,2], log_s [1,1,1,2]
    _, target = lik.prepare(x)
    nll = -lik.log_prob(out, target).item()
    s = math.exp(-1.0)
    p0 = _sigmoid((-1.0 + 1 / 255) / s)  # the lowest level takes the whole left tail
    v = 128 / 127.5 - 1.0
    p128 = _sigmoid((v + 1 / 255) / s) - _sigmoid((v - 1 / 255) / s)
    expected = -(math.log(p0) + math.log(p128))
    assert nll == pytest.approx(expected, rel=1e-5)
    assert bits_per_dim(nll, 2) == pytest.approx(expected / (2 * math.log(2)), rel=1e-5)


def test_logistic_tail_stays_finite_and_differentiable() -> None:
    lik = DiscretizedLogistic()
    out = torch.tensor([[[[5.0]], [[-7.0]]]], requires_grad=True)  # far from the target, tiny scale
    _, target = lik.prepare(torch.tensor([[[[100]]]], dtype=torch.uint8))
    log_p = lik.log_prob(out, target)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(out.grad).all()


def test_bernoulli_binarization_modes() -> None:
    x = torch.tensor([0, 100, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    assert Bernoulli("threshold").prepare(x)[1].flatten().tolist() == [0, 0, 1, 1]
    assert Bernoulli("none").prepare(x)[1].flatten().tolist() == pytest.approx([0, 100 / 255, 128 / 255, 1])
    torch.manual_seed(0)
    draws = torch.stack([Bernoulli("dynamic").prepare(x)[1].flatten() for _ in range(4000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.mean(0).tolist() == pytest.approx([0, 100 / 255, 128 / 255, 1], abs=0.03)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_vae_on_rgb_images_of_any_size(arch: str, likelihood: str) -> None:
    cfg = ModelConfig(arch=arch, likelihood=likelihood, hidden=[32], channels=[8, 16],
                      latent={"kind": "categorical", "variables": 4, "categories": 5})
    model = build_vae(cfg, image_shape=(3, 13, 21), binarize="dynamic")
    x = torch.randint(0, 256, (4, 3, 13, 21), dtype=torch.uint8)
    out = model(x, temperature=0.7)
    assert out.decoded.shape == (4, 3 * model.likelihood.params_per_channel, 13, 21)
    assert out.recon_per_sample.shape == (4,) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.reconstruct(x).shape == (4, 3, 13, 21) and model.sample(2).shape == (2, 3, 13, 21)
