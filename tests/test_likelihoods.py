"""Observation models p(x|z): the discretized logistic is a proper distribution over 256 levels
whose bits/dim can be computed by hand; the causal logistic is a proper joint distribution, causal
in raster order, decodes to its own fixed point and starts as the factorized one; Bernoulli
binarizes as configured."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import Bernoulli, DiscretizedLogistic, bits_per_dim, build_vae
from pipeline.models.likelihoods import CausalLogistic


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


def _trained_causal(channels: int, seed: int = 0) -> CausalLogistic:
    """A causal logistic whose head is not at its zero start (as after training)."""
    torch.manual_seed(seed)
    lik = CausalLogistic(channels)
    for parameter in lik.out.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return lik


def _levels(*shape: int) -> torch.Tensor:
    """Every image of the given shape [C, H, W] with two dims of 256 levels, the rest level 100."""
    grid = torch.cartesian_prod(torch.arange(256), torch.arange(256))  # [65536, 2]
    x = torch.full((len(grid), *shape), 100, dtype=torch.uint8)
    return x, grid.to(torch.uint8)


def test_causal_logistic_is_a_distribution_over_images() -> None:
    """Every 1x2 grey image (65,536 of them): the probabilities of the joint sum to one, which holds
    only if pixel 2 is conditioned on pixel 1 and not on itself."""
    lik = _trained_causal(1)
    x, values = _levels(1, 1, 2)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = values[:, 0], values[:, 1]
    _, target = lik.prepare(x)
    out = torch.randn(1, lik.params_per_channel, 1, 2).expand(len(x), -1, -1, -1)
    assert lik.log_prob(out, target).double().exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_causal_logistic_couples_the_channels_of_a_pixel() -> None:
    """One RGB pixel, R fixed: the probabilities of all 65,536 (G, B) sum to P(R) alone, and G's
    location moves with R (PixelCNN++'s coupling), B's with R and G."""
    lik = _trained_causal(3)
    out = torch.randn(1, 3 * lik.params_per_channel, 1, 1)
    for red in (0, 77, 255):
        x, values = _levels(3, 1, 1)
        x[:, 0], x[:, 1, 0, 0], x[:, 2, 0, 0] = red, values[:, 0], values[:, 1]
        _, target = lik.prepare(x)
        joint = lik.log_prob(out.expand(len(x), -1, -1, -1), target).double().exp().sum().item()
        mu, log_scale = lik.conditional(out, target[:1])
        alone = DiscretizedLogistic().log_prob(torch.cat([mu[:, :1], log_scale[:, :1]], 1), target[:1, :1]).exp()
        assert joint == pytest.approx(alone.item(), rel=2e-3), red
    _, a = lik.prepare(torch.tensor([[[[10]], [[50]], [[50]]]], dtype=torch.uint8))
    _, b = lik.prepare(torch.tensor([[[[200]], [[50]], [[50]]]], dtype=torch.uint8))
    (mu_a, _), (mu_b, _) = lik.conditional(out, a), lik.conditional(out, b)
    assert mu_a[0, 0] == mu_b[0, 0] and mu_a[0, 1] != mu_b[0, 1] and mu_a[0, 2] != mu_b[0, 2]


def test_causal_logistic_reads_only_earlier_pixels() -> None:
    """Changing pixel (5, 4) changes no earlier pixel's location or scale, and a later one's does."""
    lik = _trained_causal(3)
    out = torch.randn(2, 3 * lik.params_per_channel, 8, 8)
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    changed = target.clone()
    changed[:, :, 5, 4] = -target[:, :, 5, 4]
    (mu, scale), (mu2, scale2) = lik.conditional(out, target), lik.conditional(out, changed)
    moved = ((mu - mu2).abs() + (scale - scale2).abs()).amax(dim=(0, 1)).flatten()
    assert moved[: 5 * 8 + 4].max() == 0.0  # every pixel before (5, 4) in raster order
    assert moved[5 * 8 + 5] > 0.0 and moved[6 * 8 + 4] > 0.0  # its right neighbour, the pixel below


def test_causal_logistic_decodes_to_its_own_locations() -> None:
    """`mean` decodes pixel by pixel on windows; the result is the fixed point of the whole-image
    pass: every pixel is the (clamped) location the conditional gives it, image edges included."""
    lik = _trained_causal(3)
    out = torch.randn(3, 3 * lik.params_per_channel, 9, 7)
    decoded = lik.mean(out)
    assert decoded.shape == (3, 3, 9, 7)
    mu, _ = lik.conditional(out, decoded * 2 - 1)
    assert torch.allclose(mu.clamp(-1, 1), decoded * 2 - 1, atol=1e-5)


def test_causal_logistic_starts_as_the_factorized_logistic() -> None:
    lik = CausalLogistic(3)
    out = torch.randn(4, 3 * lik.params_per_channel, 6, 6)
    _, target = lik.prepare(torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8))
    assert torch.allclose(lik.log_prob(out, target), DiscretizedLogistic().log_prob(out[:, :6], target))
    assert torch.allclose(lik.mean(out), DiscretizedLogistic().mean(out[:, :6]))


def test_bernoulli_binarization_modes() -> None:
    x = torch.tensor([0, 100, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    assert Bernoulli("threshold").prepare(x)[1].flatten().tolist() == [0, 0, 1, 1]
    assert Bernoulli("none").prepare(x)[1].flatten().tolist() == pytest.approx([0, 100 / 255, 128 / 255, 1])
    torch.manual_seed(0)
    draws = torch.stack([Bernoulli("dynamic").prepare(x)[1].flatten() for _ in range(4000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.mean(0).tolist() == pytest.approx([0, 100 / 255, 128 / 255, 1], abs=0.03)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic", "causal-logistic"])
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
