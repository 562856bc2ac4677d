"""Schedules (learning rate, KL weight, temperature) are pure functions of the global step; the
optimizer, gradient clipping and the weight EMA; a checkpoint holds the EMA and the trained weights."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pipeline.config import ConfigError, LatentConfig, ModelConfig, TrainConfig, parse_config
from pipeline.models import build_vae, temperature_at
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.schedules import kl_weight, learning_rate, straight_through, temperature
from pipeline.train.state import TrainState
from pipeline.train.step import PrecisionStep, WeightEMA, build_optimizer


def _values(fn, steps):
    return [fn(s) for s in steps]


def _assert_pure(fn, steps) -> None:
    """Same value for a step whatever was asked before (no hidden state): in order, shuffled, repeated."""
    forward = _values(fn, steps)
    shuffled = list(steps)
    random.Random(0).shuffle(shuffled)
    again = dict(zip(shuffled, _values(fn, shuffled)))
    assert forward == [again[s] for s in steps] == _values(fn, steps)


STEPS = list(range(0, 12_000, 97)) + [0, 1, 999, 1000, 1001, 4999, 5000, 9999, 10_000, 50_000]


def test_defaults_keep_todays_behaviour() -> None:
    train, latent = TrainConfig(), LatentConfig()
    assert (train.lr_schedule, train.kl_weight, train.optimizer, train.grad_clip, train.ema) == (
        "constant", 1.0, "adam", None, None)
    for step in STEPS:
        assert learning_rate(step, train, 10_000) == train.lr
        assert kl_weight(step, train) == 1.0
        exponential = latent.tau_exponential
        assert temperature(step, latent) == temperature_at(step, latent.tau0, latent.tau_min, exponential.rate,
                                                           exponential.every)
    assert type(build_optimizer(torch.nn.Linear(2, 2).parameters(), train)) is torch.optim.Adam


def test_exponential_lr_is_jangs_step_decay() -> None:
    cfg = TrainConfig(lr=1e-3, lr_schedule="exponential", lr_decay_rate=0.9, lr_decay_every=1000)
    assert learning_rate(0, cfg, 1) == learning_rate(999, cfg, 1) == 1e-3
    assert learning_rate(1000, cfg, 1) == pytest.approx(9e-4)
    assert learning_rate(25_500, cfg, 1) == pytest.approx(1e-3 * 0.9**25)
    floored = cfg.model_copy(update={"lr_min": 1e-4})
    assert learning_rate(10**6, floored, 1) == 1e-4
    _assert_pure(lambda s: learning_rate(s, cfg, 1), STEPS)


def test_cosine_lr_with_linear_warmup() -> None:
    cfg = TrainConfig(lr=2e-3, lr_schedule="cosine", lr_warmup_steps=100, lr_min=1e-5)
    total = 10_100
    assert learning_rate(0, cfg, total) == pytest.approx(2e-3 / 100)
    assert learning_rate(49, cfg, total) == pytest.approx(1e-3)
    assert learning_rate(100, cfg, total) == pytest.approx(2e-3)  # peak right after the warm-up
    assert learning_rate(100 + 5000, cfg, total) == pytest.approx(1e-5 + (2e-3 - 1e-5) / 2)
    assert learning_rate(total, cfg, total) == pytest.approx(1e-5)
    assert learning_rate(10 * total, cfg, total) == pytest.approx(1e-5)  # stays at the floor past the horizon
    after = [learning_rate(s, cfg, total) for s in range(100, total, 50)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    _assert_pure(lambda s: learning_rate(s, cfg, total), STEPS)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_kl_warmup(shape: str) -> None:
    cfg = TrainConfig(kl_weight=6.6, kl_warmup_steps=5000, kl_warmup=shape)
    assert kl_weight(0, cfg) == 0.0
    assert kl_weight(2500, cfg) == pytest.approx(3.3)  # both shapes are at half height halfway
    assert kl_weight(5000, cfg) == pytest.approx(6.6) and kl_weight(10**6, cfg) == pytest.approx(6.6)
    ramp = [kl_weight(s, cfg) for s in range(0, 5001, 100)]
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))
    if shape == "cosine":  # slower start than linear
        assert kl_weight(500, cfg) < 6.6 * 0.1
    _assert_pure(lambda s: kl_weight(s, cfg), STEPS)


def test_temperature_schedules() -> None:
    exp = LatentConfig(tau0=1.0, tau_min=0.5, tau_exponential={"rate": 1e-4, "every": 500})
    assert temperature(0, exp) == 1.0 and temperature(499, exp) == 1.0
    assert temperature(500, exp) == pytest.approx(math.exp(-0.05))
    assert temperature(10**6, exp) == 0.5
    cos = LatentConfig(tau_schedule="cosine", tau0=1.0, tau_min=1 / 16, tau_cosine={"steps": 150_000})
    assert temperature(0, cos) == 1.0
    assert temperature(75_000, cos) == pytest.approx((1 + 1 / 16) / 2)
    assert temperature(150_000, cos) == pytest.approx(1 / 16) and temperature(10**7, cos) == pytest.approx(1 / 16)
    for cfg in (exp, cos):
        _assert_pure(lambda s: temperature(s, cfg), STEPS)


def test_straight_through_from_a_step() -> None:
    """Relaxed samples before model.latent.straight_through_from_step, one-hot forward passes from it on."""
    switch = LatentConfig(straight_through_from_step=1000)
    assert [straight_through(s, switch) for s in (0, 999, 1000, 10**6)] == [False, False, True, True]
    assert not any(straight_through(s, LatentConfig()) for s in STEPS)
    assert all(straight_through(s, LatentConfig(estimator="straight-through")) for s in STEPS)
    _assert_pure(lambda s: straight_through(s, switch), STEPS)
    # the estimator a step passes to the forward pass really decodes one-hot codes from then on
    model = build_vae(ModelConfig(hidden=[16], latent=LatentConfig(variables=3, categories=4)), input_dim=12)
    x = torch.rand(5, 12)
    for step, one_hot in ((999, False), (1000, True)):
        codes = model(x, temperature=0.5, straight_through=straight_through(step, switch)).z.detach().reshape(5, 3, 4)
        is_one_hot = bool(((codes == 0) | (codes == 1)).all()) and torch.equal(codes.sum(-1), torch.ones(5, 3))
        assert is_one_hot == one_hot
    for bad in ({"kind": "gaussian", "straight_through_from_step": 10},
                {"estimator": "straight-through", "straight_through_from_step": 10}):
        with pytest.raises(ConfigError, match="straight_through_from_step"):
            parse_config({"data": {"url": "x"}, "model": {"latent": bad}})


def test_the_step_passes_the_scheduled_estimator_to_the_forward_pass_and_leaves_the_model_as_built() -> None:
    """`train_step` hands the schedules' estimator to each forward pass, as it does the temperature: the
    model's own default (the config's model.latent.estimator) is not switched under it."""
    from pipeline.train.step import train_step

    cfg = parse_config({"data": {"url": "x"}}, ["model.hidden=[16]", "model.latent.variables=3", "model.latent.categories=4",
                                                "model.latent.straight_through_from_step=1"])
    model = build_vae(cfg.model, input_dim=12)
    state = TrainState(model, cfg.train, torch.device("cpu"), partitions=1)
    seen = []
    sample_codes = model.latent.sample_codes
    model.latent.sample_codes = lambda *args: seen.append(args[2:]) or sample_codes(*args)
    stats = [train_step(state, torch.rand(4, 12), cfg, range(1), total_steps=3) for _ in range(3)]
    assert [s.straight_through for s in stats] == [False, True, True]
    assert seen == [(False,), (True,), (True,)]
    assert model.latent.hard is False  # built Gumbel-Softmax, still so


def test_schedule_keys_in_config() -> None:
    cfg = parse_config({"data": {"url": "x"}}, [
        "train.lr_schedule=cosine", "train.lr_warmup_steps=10", "train.optimizer=adamw", "train.weight_decay=0.01",
        "train.grad_clip=1.0", "train.ema=0.999", "train.kl_weight=6.6", "train.kl_warmup_steps=5000",
        "train.kl_warmup=cosine", "model.latent.tau_schedule=cosine", "model.latent.tau_cosine.steps=1000"])
    assert cfg.train.ema == 0.999 and cfg.model.latent.tau_schedule == "cosine"
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg.train)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.01
    for bad in ("train.ema=1.0", "train.lr_schedule=linear", "train.grad_clip=0", "model.latent.tau_schedule=step"):
        with pytest.raises(ConfigError):
            parse_config({"data": {"url": "x"}}, [bad])


def test_grad_clip_scales_to_the_max_norm_and_reports_the_norm_before() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = (model(torch.randn(4, 10)) * 100).pow(2).sum()
    result = PrecisionStep("fp32", torch.device("cpu"), grad_clip=1.0).backward_and_step(loss, model, opt)
    assert result.grad_norm > 10
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert clipped == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------- the checkpoint of a run with EMA
# That a real run (Ray Train, DDP, MLflow) killed mid-epoch continues exactly, EMA, optimizer and
# schedules included, is tests/test_fault.py::test_killed_worker_resumes_exactly (and its grid twin).


def test_a_checkpoint_holds_the_ema_and_the_trained_weights_and_restores_both(tmp_path) -> None:
    from pipeline.train.step import train_step

    cfg = parse_config({"data": {"url": "x"}}, [
        "model.hidden=[16]", "model.latent.variables=3", "model.latent.categories=4", "train.ema=0.9",
        "train.optimizer=adamw", "train.lr_schedule=cosine", "train.lr_warmup_steps=3"])
    torch.manual_seed(0)
    model = build_vae(cfg.model, input_dim=12)
    first = TrainState(model, cfg.train, torch.device("cpu"), partitions=1)
    for _ in range(5):
        train_step(first, torch.rand(8, 12), cfg, range(1), total_steps=12)
    save_checkpoint(tmp_path, first, config={})
    state = load_checkpoint(tmp_path)  # weights_only=True
    # `model` is the EMA (what artifacts/evaluate read), `online_model` the trained weights.
    for name, tensor in first.ema.module.state_dict().items():
        assert torch.equal(state["model"][name], tensor)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(state["online_model"][name], tensor)
    assert state["ema"]["updates"] == 5 and (state["step"], state["step_in_epoch"], state["partitions"]) == (5, 5, 1)
    assert any(not torch.equal(state["model"][k], state["online_model"][k]) for k in state["model"])

    resumed = TrainState(build_vae(cfg.model, input_dim=12), cfg.train, torch.device("cpu"), partitions=1)
    resumed.load_state_dict(state)
    assert resumed.ema.updates == 5 and resumed.position.step == 5
    for mine, theirs in ((resumed.model, first.model), (resumed.ema.module, first.ema.module)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    for key, value in first.optimizer.state_dict()["state"].items():
        for field, tensor in value.items():
            assert torch.equal(resumed.optimizer.state_dict()["state"][key][field], tensor)


def test_ema_is_the_moving_average_and_a_checkpoint_without_one_starts_it(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.75)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # the first update uses decay min(0.75, 1/10): the average is 0.9 of the new weights
    for avg, p0 in zip(ema.module.parameters(), start):
        torch.testing.assert_close(avg, p0 + 0.9)
    assert [WeightEMA.decay_at(u, 0.75) for u in (0, 1, 8, 26, 27, 1000)] == [0.1, 2 / 11, 9 / 18, 27 / 36, 0.75, 0.75]
    # A run without EMA, resumed with it: the average starts from the trained weights.
    save_checkpoint(tmp_path, TrainState(model, TrainConfig(), torch.device("cpu"), 1), config={})
    state = load_checkpoint(tmp_path)
    assert "online_model" not in state
    fresh = TrainState(torch.nn.Linear(3, 2), TrainConfig(ema=0.75), torch.device("cpu"), 1)
    fresh.load_state_dict(state)
    for a, b, c in zip(fresh.ema.module.parameters(), fresh.model.parameters(), model.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert fresh.ema.updates == 0


def test_ema_of_a_short_run_holds_what_it_learned_not_the_initialisation() -> None:
    """0.999 averages over ~1,000 updates: a run of 300 steps without a warm-up would log weights that
    are 0.999^300 = 74% the random initialisation. With the warm-up (decay (1 + u) / (10 + u) until it
    reaches 0.999, as TensorFlow's ExponentialMovingAverage with num_updates) the average after 300
    updates to fixed trained weights is within 1e-6 of them."""
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(300):
        ema.update(model)
    for avg, p in zip(ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(avg, p, atol=1e-6, rtol=0)


def test_encoder_lr_scale_puts_the_encoder_in_its_own_group_at_a_fraction_of_the_rate() -> None:
    from pipeline.config import parse_config
    from pipeline.models import build_vae
    from pipeline.train.schedules import set_learning_rate

    cfg = parse_config({"data": {"url": "data/x"}, "model": {"arch": "conv", "channels": [4], "hidden": [8]},
                        "train": {"optimizer": "adamw", "lr": 1e-3, "encoder_lr_scale": 0.03}})
    model = build_vae(cfg.model, image_shape=(1, 8, 8))
    optimizer = build_optimizer(model, cfg.train)
    encoder, rest = optimizer.param_groups
    assert [id(p) for p in encoder["params"]] == [id(p) for p in model.encoder.parameters()]
    assert len(encoder["params"]) + len(rest["params"]) == len(list(model.parameters()))
    set_learning_rate(optimizer, 2e-3)
    assert (encoder["lr"], rest["lr"]) == (2e-3 * 0.03, 2e-3)
    plain = build_optimizer(model, parse_config({"data": {"url": "data/x"}}).train)  # scale 1: one group, the scheduled rate
    set_learning_rate(plain, 2e-3)
    assert [g["lr"] for g in plain.param_groups] == [2e-3]


def test_resume_refuses_a_changed_schedule_unless_rescheduled(tmp_path, tracking_uri, monkeypatch) -> None:
    """A resumed run continues each schedule from its step: a new cosine horizon (train.epochs) or a new
    tau_cosine.steps would bend the part already trained, so `pipeline train --resume` refuses them by name
    unless --reschedule; settings that shape no schedule (train.workers) pass."""
    import subprocess
    import sys

    from pipeline.train.trainer import resume_config
    from pipeline.runs.store import start_run

    cosine = parse_config({"data": {"url": str(tmp_path)}, "tracking": {"uri": tracking_uri, "experiment": "resume"},
                           "train": {"lr_schedule": "cosine", "epochs": 10},
                           "model": {"latent": {"tau_schedule": "cosine", "tau_cosine": {"steps": 500}}}})
    run_id = start_run(cosine, tracking_uri=tracking_uri, manifest_digest="x")
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # where --resume looks for the run

    with pytest.raises(ConfigError) as refused:
        resume_config(run_id, config_path=None, overrides=["train.epochs=20", "model.latent.tau_cosine.steps=900"])
    message = str(refused.value)
    assert "train.epochs 10 -> 20" in message and "model.latent.tau_cosine.steps 500 -> 900" in message
    assert "--reschedule" in message and run_id in message and "train.workers" not in message
    cfg, same = resume_config(run_id, config_path=None, overrides=["train.epochs=20"], reschedule=True)
    assert same == run_id and cfg.train.epochs == 20
    cfg, _ = resume_config(run_id, config_path=None, overrides=["train.workers=1"])
    assert cfg.train.workers == 1

    constant = cosine.model_copy(update={"train": cosine.train.model_copy(update={"lr_schedule": "constant"})})
    constant_run = start_run(constant, tracking_uri=tracking_uri, manifest_digest="x")
    cfg, _ = resume_config(constant_run, config_path=None, overrides=["train.epochs=20"])  # no horizon to bend
    assert cfg.train.epochs == 20

    import os

    cli = subprocess.run([sys.executable, "-m", "pipeline", "train", "--resume", run_id, "-o", "train.epochs=20"],
                         capture_output=True, text=True, env=os.environ | env, timeout=120)
    assert cli.returncode == 2 and "train.epochs 10 -> 20" in cli.stderr, cli.stderr
    cli = subprocess.run([sys.executable, "-m", "pipeline", "train", "configs/digits-categorical.yaml", "--reschedule"],
                         capture_output=True, text=True, env=os.environ | env, timeout=120)
    assert cli.returncode == 2 and "--reschedule applies to a resumed run" in cli.stderr, cli.stderr
