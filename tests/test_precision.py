"""Mixed precision steps on CPU (the GPU path uses the same code with device cuda)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import build_vae
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


def test_grad_scaler_state_survives_a_checkpoint():
    step = PrecisionStep("fp16", torch.device("cpu"))
    state = {"scale": torch.tensor(1024.0), "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 7}
    step.load_state_dict(state)
    assert step.state_dict()["scale"] == 1024.0 and step.state_dict()["_growth_tracker"] == 7
    assert PrecisionStep("fp32", torch.device("cpu")).state_dict() == {}
