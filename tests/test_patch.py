"""The patch tokenizer (models/patch.py), its K-means start and the Gaussian likelihood."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, parse_config
from pipeline.models import build_vae
from pipeline.models.likelihoods import Gaussian, build_likelihood
from pipeline.models.code_use import argmax_counts, codes_used


def _cfg(k: int = 8, **extra) -> ModelConfig:
    return ModelConfig(arch="patch", downsample=4, channels=[16], blocks=1, codebook_dim=48, likelihood="gaussian",
                       latent={"categories": k}, **extra)


def _tiled(patches: torch.Tensor, images: int, grid: int, seed: int = 0) -> torch.Tensor:
    """uint8 images [images, 3, 4 * grid, 4 * grid] whose 4x4 cells are drawn from ``patches`` [P, 3, 4, 4]."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(patches), (images, grid, grid), generator=g)
    cells = patches[which]  # [B, gh, gw, 3, 4, 4]
    return cells.permute(0, 3, 1, 4, 2, 5).reshape(images, 3, 4 * grid, 4 * grid)


def test_kmeans_start_is_the_vector_quantizer_of_the_cells() -> None:
    """Images made of 8 known 4x4 patches: `code_init: kmeans` finds them as the 8 centres, so at
    step 0 every cell's code is its patch (all 8 codes in use) and the decoder rebuilds the images
    exactly (pixels within float error: PSNR at the cap), with no training."""
    torch.manual_seed(0)
    patches = torch.randint(0, 256, (8, 3, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = _tiled(patches, 32, 4)  # 512 cells
    model = build_vae(_cfg(code_init="kmeans", code_init_spread=50.0), image_shape=(3, 16, 16))
    assert (model.reconstruct(x) * 255 - x.float()).abs().max() > 20  # not a copy before the init
    model.init_codes_from_data(x, seed=0, method="kmeans", spread=50.0)
    logits = model.encode(model.prepare(x)[0]).reshape(-1, 8)
    assert codes_used(argmax_counts(logits)) == 1.0
    assert (model.reconstruct(x) * 255 - x.float()).abs().max() < 1e-3
    # one code per patch: cells holding the same patch share a code, different patches differ
    cells = torch.nn.functional.pixel_unshuffle(x.float(), 4).permute(0, 2, 3, 1).reshape(-1, 48)
    codes = logits.argmax(dim=-1)
    for c in range(8):
        assert torch.unique(cells[codes == c], dim=0).shape[0] == 1
    assert logits.std(dim=-1).mean().item() == pytest.approx(50.0, rel=1e-4)


def test_patch_model_trains_and_decodes_token_grids_like_one_hot_codes() -> None:
    torch.manual_seed(0)
    model = build_vae(_cfg(k=16, entropy_weight=1.0), image_shape=(3, 16, 16))
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = model(x, temperature=0.5)
    assert out.decoded.shape == (4, 3, 16, 16) and out.params.shape == (4, 16 * 16)
    model.objective(out, 1.0).backward()
    assert all(p.grad is not None for p in model.parameters())
    tokens = torch.randint(0, 16, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(tokens, 16).float().reshape(2, -1)
    assert torch.allclose(model.decoder(one_hot), model.decoder.decode_indices(tokens), atol=1e-5)


def test_gaussian_likelihood_is_the_normal_density_of_the_pixels() -> None:
    g = Gaussian(0.05)
    out = torch.rand(2, 3, 4, 4)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    _, target = g.prepare(x)
    expected = torch.distributions.Normal(out, 0.05).log_prob(x.float() / 255).flatten(1).sum(-1)
    assert torch.allclose(g.log_prob(out, target), expected, rtol=1e-5)
    assert torch.equal(g.mean(torch.tensor([-0.2, 0.3, 1.4]).view(1, 3, 1, 1)).flatten(), torch.tensor([0.0, 0.3, 1.0]))
    assert build_likelihood("gaussian", gaussian_std=0.1).std == 0.1
    assert not g.eight_bit and g.params_per_channel == 1


def test_patch_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="arch patch takes one width"):
        parse_config({"data": {"url": "d"}, "model": {"arch": "patch", "channels": [8, 16], "latent": {"kind": "categorical"}}})
    with pytest.raises(ConfigError, match="arch patch needs model.latent.kind categorical"):
        parse_config({"data": {"url": "d"}, "model": {"arch": "patch", "channels": [8], "latent": {"kind": "gaussian"}}})
    small = build_vae(_cfg().model_copy(update={"codebook_dim": 16}), image_shape=(3, 16, 16))
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"codebook_dim >= C\*f\*f = 48"):
        small.init_codes_from_data(x, seed=0, method="kmeans")
    assert math.prod(build_vae(_cfg(), image_shape=(3, 16, 16)).encoder.grid) == 16
