"""Dead-code restarts (models/code_restart.py, VAE.split_dead_codes, train/code_init.restart_dead_codes)
on constructed heads, on a small grid model and on a real training state with its EMA and optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig, RunConfig, parse_config
from pipeline.models import build_vae
from pipeline.models.code_restart import apply_splits, head_temperature, plan_splits
from pipeline.train.code_init import restart_dead_codes
from pipeline.train.state import TrainState
from pipeline.train.step import train_step


def _distance_head(centres: torch.Tensor, temperature: float) -> nn.Linear:
    """logits = -|f - c_k|^2 / T up to |f|^2 / T: what ResNetEncoder.init_codes writes."""
    head = nn.Linear(centres.shape[1], centres.shape[0])
    with torch.no_grad():
        head.weight.copy_(2 * centres / temperature)
        head.bias.copy_(-centres.pow(2).sum(-1) / temperature)
    return head


def _clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight clusters of 40 features each in 2-D, and K = 4 centres: three on the clusters,
    code 3 far from every feature (dead)."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = torch.cat([m + 0.5 * torch.randn(40, 2, generator=g) for m in means])
    centres = torch.cat([means, torch.tensor([[100.0, 100.0]])])
    return features, centres


def test_head_temperature_reads_a_distance_head() -> None:
    _, centres = _clusters()
    head = _distance_head(centres[:3], temperature=3.5)  # the far centre would dominate the median's spread
    assert head_temperature(head.weight, head.bias) == pytest.approx(3.5, rel=1e-5)
    assert head_temperature(torch.ones(2, 3), torch.ones(2)) is None  # no code reads as a distance


def test_a_dead_code_takes_half_of_one_busy_code_and_nothing_else() -> None:
    features, centres = _clusters()
    head = _distance_head(centres, temperature=2.0)
    codebook = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    before = head(features).argmax(-1)
    assert torch.bincount(before, minlength=4).tolist() == [40, 40, 40, 0]
    splits = plan_splits(features, head, torch.Generator().manual_seed(1))
    assert [s.dead for s in splits] == [3] and splits[0].scale == pytest.approx(2 / 2.0, rel=1e-5)
    donor = splits[0].donor
    apply_splits(head, codebook, splits)
    after = head(features).argmax(-1)
    moved = before != after
    # only the donor's positions move, all of them to the dead code, and only some of them
    assert moved.any() and torch.all(before[moved] == donor) and torch.all(after[moved] == 3)
    assert 0 < int(moved.sum()) < 40
    # moved = the donor's positions nearer the drawn position f than the donor's mean
    s = splits[0]
    mean, f = s.midpoint - s.direction / 2, s.midpoint + s.direction / 2
    members = before == donor
    nearer_f = (features - f).norm(dim=-1) < (features - mean).norm(dim=-1)
    assert torch.equal(moved, members & nearer_f)
    assert torch.equal(codebook[3], codebook[donor])  # the split positions decode as before


def test_no_dead_code_no_split() -> None:
    features, centres = _clusters()
    head = _distance_head(centres[:3], temperature=2.0)
    assert plan_splits(features, head, torch.Generator().manual_seed(0)) == []


K = 64
IMAGE = (3, 16, 16)


def _config(**train) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"url": "unused", "channels": 3, "image_size": [16, 16]},
        "model": {"arch": "patch", "downsample": 4, "channels": [8], "blocks": 1, "codebook_dim": 48,
                  "likelihood": "gaussian", "code_init": "kmeans", "restart_dead_codes": True,
                  "latent": {"categories": K, "estimator": "straight-through"}},
        "train": {"batch_size": 8, "workers": 1, "optimizer": "adamw", "lr": 1e-3, **train},
    })


def _pool() -> torch.Tensor:
    return torch.randint(0, 256, (16, *IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _state(cfg: RunConfig) -> TrainState:
    torch.manual_seed(0)
    model = build_vae(cfg.model, image_shape=IMAGE)
    model.init_codes_from_data(_pool(), seed=0, method="kmeans")
    state = TrainState(model, cfg.train, torch.device("cpu"), 1)
    train_step(state, _pool()[:8], cfg, range(1), total_steps=10)  # Adam moments exist for every row
    return state


def _used(model: nn.Module, pool: torch.Tensor) -> torch.Tensor:
    logits = model.encode(model.prepare(pool)[0]).reshape(-1, K)
    return logits.argmax(-1).unique()


def _kill(model: nn.Module, codes: slice) -> None:
    with torch.no_grad():  # their logits can never win
        model.encoder.to_logits.bias[codes] -= 1e6


def test_a_restart_revives_every_dead_code_in_the_model_its_ema_and_the_optimizer() -> None:
    cfg, pool = _config(ema=0.9), _pool()
    state = _state(cfg)
    for model in (state.model, state.ema.module):
        _kill(model, slice(0, 10))
    head, codebook = state.model.encoder.to_logits, state.model.decoder.codebook
    for p in (head.weight, head.bias, codebook):  # make the dead rows' moments recognisable
        state.optimizer.state[p]["exp_avg"][:10] = 123.0
    dead = K - len(_used(state.model, pool))
    assert dead >= 10
    replica = copy.deepcopy(state)

    assert restart_dead_codes(state, pool, seed=0) == dead
    assert len(_used(state.model, pool)) > K - dead  # some of j's positions now pick the restarted codes
    ema_codebook = state.ema.module.decoder.codebook
    for k in range(10):  # each restarted code decodes as its donor does, in the EMA too
        assert any(torch.equal(codebook[k], codebook[j]) for j in range(10, K))
        assert any(torch.equal(ema_codebook[k], ema_codebook[j]) for j in range(10, K))
    for p in (head.weight, head.bias, codebook):
        assert not (state.optimizer.state[p]["exp_avg"][:10] == 123.0).any()  # donors' moments copied in
    # another rank with the same weights, pool, seed and step makes the same edit: no collective needed
    assert restart_dead_codes(replica, pool, seed=0) == dead
    for a, b in ((state.model, replica.model), (state.ema.module, replica.ema.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert math.isfinite(state.model(pool).loss.item())
    assert restart_dead_codes(state, pool, seed=0) <= dead  # the next restart finds fewer or as many


def test_restarts_draw_by_seed_and_step() -> None:
    cfg, pool = _config(), _pool()
    first, second = _state(cfg), _state(cfg)
    for state in (first, second):
        _kill(state.model, slice(0, 10))
    second.position.step += 1
    restart_dead_codes(first, pool, seed=0)
    restart_dead_codes(second, pool, seed=0)
    assert not torch.equal(first.model.encoder.to_logits.weight, second.model.encoder.to_logits.weight)


def test_restarts_need_a_grid() -> None:
    with pytest.raises(ConfigError, match="restart_dead_codes"):
        parse_config({"data": {"url": "x"}, "model": {"arch": "mlp", "restart_dead_codes": True}})
    model = build_vae(ModelConfig(arch="mlp", hidden=[8], latent={"variables": 2, "categories": 3}),
                      image_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="needs a grid"):
        model.split_dead_codes(torch.zeros(2, 1, 4, 4), torch.Generator())
