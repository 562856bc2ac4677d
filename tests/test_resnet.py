"""The residual grid model (models/resnet.py), its memory figures, and the logit-Laplace likelihood."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, ModelConfig, parse_config
from pipeline.models import build_vae
from pipeline.models.latents import CategoricalLatent
from pipeline.models.likelihoods import LogitLaplace, build_likelihood
from pipeline.models.resnet import (
    GRID_COPIES,
    ResNetDecoder,
    code_indices,
    grid_batch_bytes,
    grid_shape,
    grid_to_params,
    params_to_grid,
)


def _cfg(f: int, k: int = 16, **extra) -> ModelConfig:
    stages = int(math.log2(f)) + 1
    return ModelConfig(arch="resnet", downsample=f, channels=[8] * stages, blocks=1, codebook_dim=8,
                       likelihood="logit-laplace", latent={"categories": k, **extra.pop("latent", {})}, **extra)


@pytest.mark.parametrize("f", [4, 8])
def test_grid_shapes_on_rgb_32(f: int) -> None:
    torch.manual_seed(0)
    model = build_vae(_cfg(f), image_shape=(3, 32, 32))
    h = w = 32 // f
    assert model.encoder.grid == (h, w) and model.latent.variables == h * w  # latent.variables (20) overridden
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = model(x, temperature=0.7)
    assert out.params.shape == (2, h * w * 16) and out.z.shape == (2, h * w * 16)
    assert out.decoded.shape == (2, 3 * 2, 32, 32)  # logit-Laplace: mu and log b per channel
    assert out.kl_per_variable.shape == (h * w,)
    assert model.reconstruct(x).shape == (2, 3, 32, 32) and model.sample(3).shape == (3, 3, 32, 32)
    out.loss.backward()
    assert model.decoder.codebook.grad is not None and model.encoder.to_logits.weight.grad.abs().sum() > 0


def test_params_layout_is_position_major_class_last() -> None:
    torch.manual_seed(0)
    model = build_vae(_cfg(4, k=5), image_shape=(1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    params = model.encode(x)
    # The channel-last linear equals a 1x1 conv on the features; the flat layout round-trips.
    conv_logits = F.conv2d(model.encoder.features(x), model.encoder.to_logits.weight[:, :, None, None],
                           model.encoder.to_logits.bias)
    torch.testing.assert_close(params_to_grid(params, (2, 2)), conv_logits)
    torch.testing.assert_close(grid_to_params(conv_logits), params)
    # Variable n = i * w + j holds the logits of position (i, j): the latent's mode is the grid's argmax.
    mode = model.latent.mode(params).reshape(3, 4, 5).argmax(-1)
    assert torch.equal(mode.reshape(3, 2, 2), code_indices(params, (2, 2), 5))
    assert torch.equal(mode.reshape(3, 2, 2), conv_logits.argmax(1))


def test_codebook_embeds_one_hot_codes_and_token_grids_alike() -> None:
    torch.manual_seed(0)
    decoder = ResNetDecoder((2, 3), [4, 4, 4], 7, 2, downsample=4, blocks=1, codebook_dim=5)
    tokens = torch.randint(0, 7, (2, 2, 3))
    one_hot = F.one_hot(tokens, 7).float().reshape(2, -1)
    embedded = decoder.embed(one_hot)
    assert embedded.shape == (2, 5, 2, 3)
    torch.testing.assert_close(embedded[1, :, 1, 2], decoder.codebook[tokens[1, 1, 2]])
    torch.testing.assert_close(decoder(one_hot), decoder.decode_indices(tokens))


def test_resnet_config_is_checked() -> None:
    with pytest.raises(ValueError, match="3 stage widths"):
        ModelConfig(arch="resnet", downsample=4, channels=[8, 8])
    with pytest.raises(ValueError, match="categorical"):
        ModelConfig(arch="resnet", channels=[8, 8, 8], latent={"kind": "gaussian"})
    with pytest.raises(ConfigError, match="downsample"):
        parse_config({"data": {"url": "x"}, "model": {"arch": "resnet", "downsample": 2}})
    with pytest.raises(ValueError, match="multiple of model.downsample"):
        grid_shape((3, 30, 32), 4)
    cfg = parse_config({"data": {"url": "x"}, "model": {"arch": "resnet", "downsample": 8, "channels": [8, 8, 8, 8],
                                                        "blocks": 1, "codebook_dim": 16, "likelihood": "logit-laplace"}})
    assert build_vae(cfg.model, image_shape=(3, 16, 16)).latent.variables == 4


def _saved_copies(hard: bool, kl: str, n: int = 6, k: int = 50, batch: int = 2) -> int:
    """Unique storages of >= B*N*K elements alive for backward: the logits + what autograd saves."""
    latent = CategoricalLatent(n, k, hard=hard, kl=kl)
    codebook = torch.randn(k, 3, requires_grad=True)
    params = torch.randn(batch, n * k, requires_grad=True)
    big = batch * n * k
    seen = {params.untyped_storage().data_ptr()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= big:
            seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, kl_terms = latent.sample_and_kl(params, 0.5)
        loss = (z.reshape(batch, n, k) @ codebook).sum() + kl_terms.sum()
    loss.backward()
    return len(seen)


@pytest.mark.parametrize("hard,kl", [(False, "analytic"), (True, "analytic"), (False, "relaxed"), (True, "relaxed")])
def test_grid_copies_match_what_autograd_keeps(hard: bool, kl: str) -> None:
    assert _saved_copies(hard, kl) == GRID_COPIES[("hard" if hard else "soft", kl)]


def test_grid_batch_bytes_for_dalle_grid() -> None:
    per_copy = 32 * 32 * 8192 * 4
    assert per_copy == 32 * 2**20  # 32 MiB per image per copy
    assert grid_batch_bytes(8, (32, 32), 8192) == 8 * per_copy * GRID_COPIES[("soft", "analytic")]
    assert grid_batch_bytes(8, (32, 32), 8192) / 2**30 == pytest.approx(1.75)


def test_forward_backward_at_k8192_on_a_1x1_grid() -> None:
    torch.manual_seed(0)
    model = build_vae(_cfg(4, k=8192, latent={"estimator": "straight-through", "prior": "learned"}),
                      image_shape=(3, 4, 4))
    assert model.latent.variables == 1 and model.latent.param_size == 8192
    out = model(torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8), temperature=1.0)
    assert torch.equal(out.z.sum(-1), torch.ones(4))  # straight-through: one-hot forward
    assert math.isfinite(out.loss.item()) and out.kl.item() <= math.log(8192) + 1e-3
    out.loss.backward()
    assert model.encoder.to_logits.weight.grad.abs().sum() > 0  # the relaxed gradient reaches the encoder
    assert model.latent.prior_logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- logit-Laplace

def test_logit_laplace_matches_a_hand_computed_value() -> None:
    lik = build_likelihood("logit-laplace")
    assert isinstance(lik, LogitLaplace) and lik.params_per_channel == 2 and not lik.eight_bit
    x = torch.tensor([[[[0.25]]]])  # pixel in [0, 1] -> y = 0.8 * 0.25 + 0.1 = 0.3
    inputs, target = lik.prepare(x)
    assert target.item() == pytest.approx(0.3) and torch.equal(inputs, target)
    mu, b = 0.3, 0.5
    out = torch.tensor([[[[mu]], [[math.log(b)]]]])
    logit = math.log(0.3 / 0.7)
    expected = -abs(logit - mu) / b - math.log(2 * b) - math.log(0.3) - math.log(0.7) + math.log(0.8)
    assert lik.log_prob(out, target).item() == pytest.approx(expected, rel=1e-5)
    assert lik.prepare(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))[1].flatten().tolist() == pytest.approx([0.1, 0.9])


@pytest.mark.parametrize("mu,b", [(0.0, 1.0), (1.5, 0.3), (-0.7, 0.05)])
def test_logit_laplace_density_integrates(mu: float, b: float) -> None:
    lik = LogitLaplace()
    t = torch.linspace(-40.0, 40.0, 400_001, dtype=torch.float64)  # y = sigmoid(t), dy = y (1 - y) dt
    y = torch.sigmoid(t).clamp(1e-300, 1 - 1e-16)
    out = torch.tensor([mu, math.log(b)], dtype=torch.float64).reshape(1, 2, 1, 1).expand(len(t), 2, 1, 1)
    log_px = lik.log_prob(out, y.reshape(-1, 1, 1, 1))  # the density of the pixel x
    density_y = (log_px - math.log(0.8)).exp()  # f(y) on (0, 1)
    dt = float(t[1] - t[0])
    assert float((density_y * y * (1 - y)).sum() * dt) == pytest.approx(1.0, abs=1e-3)
    # Over the pixels x in [0, 1] it integrates to the Laplace mass of logit(y) inside [logit .1, logit .9].
    inside = (y >= 0.1) & (y <= 0.9)
    mass_x = float((log_px.exp() * y * (1 - y) / 0.8)[inside].sum() * dt)
    cdf = lambda v: 0.5 * math.exp((v - mu) / b) if v < mu else 1 - 0.5 * math.exp(-(v - mu) / b)  # noqa: E731
    assert mass_x == pytest.approx(cdf(math.log(9)) - cdf(-math.log(9)), abs=2e-3)


def test_logit_laplace_mean_unmaps_pixels() -> None:
    lik = LogitLaplace()
    x = torch.rand(2, 3, 4, 4)
    _, target = lik.prepare(x)
    out = torch.cat([torch.logit(target), torch.zeros_like(target)], dim=1)
    torch.testing.assert_close(lik.mean(out), x)


def test_weight_gradients_keep_the_parameters_layout() -> None:
    # DDP's gradient buckets copy (and warn about) gradients whose strides differ from the parameter's.
    model = build_vae(_cfg(4), image_shape=(3, 16, 16))
    model(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), temperature=0.5).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()] == []


def test_code_init_from_data_starts_every_code_in_use_and_above_the_noise() -> None:
    """`model.code_init: data`: each of the K codes is the nearest centre of its own grid position, so
    on the images it was drawn from every code is some position's argmax; the logits spread by
    CODE_INIT_SPREAD (5) across codes, against 0.1 at PyTorch's default initialisation."""
    from pipeline.models.resnet import CODE_INIT_SPREAD

    torch.manual_seed(0)
    model = build_vae(_cfg(4, k=64, code_init="data"), image_shape=(3, 16, 16))  # a 4x4 grid
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)  # 128 positions >= K = 64
    before = model.encode(model.prepare(x)[0]).reshape(-1, 64)
    model.init_codes_from_data(x, seed=0)
    logits = model.encode(model.prepare(x)[0]).reshape(-1, 64)
    assert before.std(dim=-1).mean() < 0.5
    assert logits.argmax(dim=-1).unique().numel() == 64
    features = model.encoder.features(model.prepare(x)[0]).permute(0, 2, 3, 1).reshape(-1, 8)
    distances = torch.cdist(features, features[torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64]])
    assert torch.equal(logits.argmax(dim=-1), distances.argmin(dim=-1))  # nearest centre = most probable code
    assert logits.std(dim=-1).mean().item() == pytest.approx(CODE_INIT_SPREAD, rel=1e-4)
    with pytest.raises(ValueError, match="at least K = 64 grid positions, got 48"):
        model.init_codes_from_data(x[:3], seed=0)


def test_code_entropy_term_on_constructed_logits() -> None:
    """N * (H per position - H pooled): -N log K when every position is certain and the batch uses
    the K codes equally; 0 when every position is certain of one and the same code."""
    latent = CategoricalLatent(4, 8)
    spread = torch.full((2, 4, 8), -1e4)
    spread.view(-1, 8)[torch.arange(8), torch.arange(8)] = 0.0  # the 8 positions use the 8 codes once each
    per_position, pooled = latent.code_entropy(spread.reshape(2, 32))
    assert per_position.item() == pytest.approx(0.0, abs=1e-6) and pooled.item() == pytest.approx(math.log(8))
    same = torch.full((2, 4, 8), -1e4)
    same[..., 3] = 0.0
    per_position, pooled = latent.code_entropy(same.reshape(2, 32))
    assert per_position.item() == pytest.approx(0.0, abs=1e-6) and pooled.item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(2, 32)  # uncertain positions: H = log K each, pooled log K: the term is 0
    per_position, pooled = latent.code_entropy(uniform)
    assert per_position.item() == pytest.approx(math.log(8)) and pooled.item() == pytest.approx(math.log(8))


def test_objective_adds_the_weighted_entropy_term_to_the_weighted_elbo() -> None:
    torch.manual_seed(0)
    model = build_vae(_cfg(4, k=16, entropy_weight=2.5), image_shape=(3, 16, 16))
    out = model(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), temperature=1.0)
    per_position, pooled = model.latent.code_entropy(out.params)
    assert out.code_entropy.item() == pytest.approx(16 * (per_position - pooled).item(), rel=1e-5)
    assert model.objective(out, 0.3).item() == pytest.approx(
        (out.recon + 0.3 * out.kl + 2.5 * out.code_entropy).item(), rel=1e-6)
    plain = build_vae(_cfg(4, k=16), image_shape=(3, 16, 16))
    assert plain(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).code_entropy == 0.0


def test_code_init_and_entropy_need_a_grid() -> None:
    with pytest.raises(ConfigError, match="apply to a grid"):
        parse_config({"data": {"url": "d"}, "model": {"arch": "conv", "code_init": "data"}})
    with pytest.raises(ConfigError, match="apply to a grid"):
        parse_config({"data": {"url": "d"}, "model": {"entropy_weight": 1.0}})


def test_code_entropy_gradient_stays_finite_when_a_code_is_unused() -> None:
    """Confident positions leave the codes no position takes with a pooled mass that underflows to 0,
    where x log x has an infinite slope: the term must still give finite gradients (a NaN here
    stops training at its first steps)."""
    latent = CategoricalLatent(4, 8)
    logits = torch.full((2, 4, 8), -1e4)
    logits[..., :2] = 0.0  # every position split between codes 0 and 1; codes 2..7 pooled mass exp(-1e4) = 0
    logits.requires_grad_()
    per_position, pooled = latent.code_entropy(logits.reshape(2, 32))
    assert pooled.item() == pytest.approx(math.log(2)) and per_position.item() == pytest.approx(math.log(2))
    (per_position - pooled).backward()
    assert torch.isfinite(logits.grad).all()
