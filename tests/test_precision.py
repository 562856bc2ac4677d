"""Mixed precision steps on CPU (the GPU path uses the same code with device cuda)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.models import build_vae
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.state import TrainState
from pipeline.train.step import PrecisionStep


def _train(precision: str, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    model = build_vae(ModelConfig(hidden=[64], latent={"kind": "categorical", "variables": 4, "categories": 4}), 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = PrecisionStep(precision, torch.device("cpu"))
    prototypes = (torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    x = prototypes[torch.arange(32) % 4]  # structure the latent code can capture
    losses = []
    for _ in range(steps):
        with step.autocast():
            out = model(x, temperature=1.0)
        result = step.backward_and_step(out.loss, model, optimizer)
        assert not result.nonfinite
        losses.append(out.loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    return losses


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains(precision):
    losses = _train(precision)
    assert losses[-1] < 0.9 * losses[0]


def test_bf16_runs_the_forward_in_bf16():
    model = torch.nn.Linear(8, 8)
    with PrecisionStep("bf16", torch.device("cpu")).autocast():
        assert model(torch.rand(2, 8)).dtype == torch.bfloat16


def test_nan_loss_is_nonfinite_and_not_applied_in_every_precision():
    for precision in ["fp32", "bf16", "fp16"]:
        model = torch.nn.Linear(4, 1)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = PrecisionStep(precision, torch.device("cpu"))
        with step.autocast():
            loss = model(torch.full((3, 4), float("nan"))).float().mean()
        assert step.backward_and_step(loss, model, optimizer).nonfinite
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), precision


def test_fp16_runs_the_forward_in_fp16_and_steps_through_the_grad_scaler():
    """On CPU too: autocast to float16, and the updates go through the scaler, which skips a step
    whose scaled gradients overflow and halves its scale (that skip is not a non-finite batch)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = PrecisionStep("fp16", torch.device("cpu"))
    x = torch.rand(4, 8)
    with precision.autocast():
        assert model(x).dtype == torch.float16
    assert precision.state_dict()["scale"] == 2.0**16  # the scaler's initial scale
    before = [p.detach().clone() for p in model.parameters()]
    with precision.autocast():
        loss = model(x).float().mean() * 1e36  # finite; its gradient times 2**16 overflows float32
    assert torch.isfinite(loss)
    assert not precision.backward_and_step(loss, model, optimizer).nonfinite
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped by the scaler
    assert (precision.state_dict()["scale"], precision.state_dict()["_growth_tracker"]) == (2.0**15, 0)
    with precision.autocast():
        loss = model(x).float().mean()
    assert not precision.backward_and_step(loss, model, optimizer).nonfinite
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # applied
    assert (precision.state_dict()["scale"], precision.state_dict()["_growth_tracker"]) == (2.0**15, 1)


def test_grad_scaler_state_goes_through_a_checkpoint_and_training_continues_as_uninterrupted(tmp_path):
    """fp16: the scaler's state (a backed-off scale, its growth count) saved with the `TrainState` by
    save_checkpoint and read back with load_checkpoint (weights_only) as the loop resumes; the resumed
    steps equal the uninterrupted ones, weights and scaler alike."""
    def fresh() -> TrainState:
        torch.manual_seed(0)
        return TrainState(torch.nn.Linear(8, 1), TrainConfig(precision="fp16", lr=1e-2), torch.device("cpu"), 1)

    def train_step(state: TrainState, i: int) -> None:
        x = torch.rand(4, 8, generator=torch.Generator().manual_seed(i))
        with state.precision.autocast():
            loss = state.model(x).float().mean() * (1e36 if i in (2, 6) else 1.0)  # overflows once scaled: skipped
        assert not state.precision.backward_and_step(loss, state.model, state.optimizer).nonfinite
        state.position.advance()

    state = fresh()
    for i in range(5):
        train_step(state, i)
    saved = state.precision.state_dict()  # backed off (step 2, and any step the scaler found too large) and counting
    assert saved["scale"] < 2.0**16 and saved["_growth_tracker"] == 2
    save_checkpoint(tmp_path, state, config={})
    resumed = fresh()  # as train/loop.py restores a worker
    resumed.load_state_dict(load_checkpoint(tmp_path))
    assert resumed.precision.state_dict() == state.precision.state_dict() and resumed.position.step == 5
    for i in range(5, 9):
        train_step(state, i)
        train_step(resumed, i)
    assert state.precision.state_dict()["scale"] == saved["scale"] / 2  # step 6 backed off from the restored scale
    assert resumed.precision.state_dict() == state.precision.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), resumed.model.parameters()))
    assert PrecisionStep("fp32", torch.device("cpu")).state_dict() == {}
