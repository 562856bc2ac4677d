"""`TrainState`: everything a run continues from, and its `state_dict` (the checkpoint's content).

The model (and its DDP wrapper, which trains it), the optimizer, the precision step (fp16's grad
scaler), the weight EMA, the position in the run and the number of data partitions. The schedules
(learning rate, KL weight, temperature, estimator) are pure functions of the global step: the
position is their whole state.

The state dict, loadable with ``torch.load(weights_only=True)``:

- ``model``: the model the run produced, the one to evaluate and log: with ``train.ema`` on, the
  EMA's weights. Readers that only want the model (artifacts, evaluate) read this key alone.
- ``online_model`` (EMA runs only): the weights the optimizer trains; ``ema``: the EMA's update count.
- ``optimizer``, ``grad_scaler`` (fp16's, else empty).
- ``step`` (global), ``epoch`` and ``step_in_epoch`` (what comes next, 0-based).
- ``partitions``: fixes the sample order (data/stream.py), so it travels with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.train.step import PrecisionStep, WeightEMA, build_optimizer


@dataclass
class Position:
    """Where training stands: `step` is global; `epoch`, `step_in_epoch` say what comes next."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    def advance(self) -> None:
        self.step += 1
        self.step_in_epoch += 1

    def next_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) is done: the next one starts at its first step."""
        self.epoch, self.step_in_epoch = epoch + 1, 0


class TrainState:
    """The training state of one worker. ``ddp`` is what forward and backward run through: the
    model itself until `wrap` replaces it with its DDP wrapper."""

    def __init__(self, model: torch.nn.Module, train_cfg: Any, device: torch.device, partitions: int) -> None:
        self.model = model.to(device)  # before the EMA copies it, so both live on the rank's device
        self.ddp: torch.nn.Module = self.model
        self.optimizer = build_optimizer(self.model, train_cfg)
        self.precision = PrecisionStep(train_cfg.precision, device, grad_clip=train_cfg.grad_clip)
        self.ema = WeightEMA(self.model, train_cfg.ema) if train_cfg.ema else None
        self.position = Position()
        self.partitions = partitions

    @property
    def evaluated(self) -> torch.nn.Module:
        """The model validation scores and the run logs: the EMA's when there is one."""
        return self.ema.module if self.ema else self.model

    def wrap(self, prepare: Any) -> None:
        """``prepare(model)`` wraps the model for data-parallel training (ray.train.torch.prepare_model)."""
        self.ddp = prepare(self.model)

    def state_dict(self) -> dict[str, Any]:
        weights = self.model.state_dict()
        state = {
            "model": weights if self.ema is None else self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.precision.state_dict(),
            "step": self.position.step,
            "epoch": self.position.epoch,
            "step_in_epoch": self.position.step_in_epoch,
            "partitions": self.partitions,
        }
        if self.ema is not None:
            state["online_model"] = weights
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. A state without an EMA (EMA switched on at resume) starts the
        average from the trained weights."""
        trained = state.get("online_model", state["model"])
        self.model.load_state_dict(trained)
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("grad_scaler", {}))
        if self.ema is not None:
            self.ema.load_state_dict(state["model"], state.get("ema", {}) if "online_model" in state else {})
        self.position = Position(state["step"], state["epoch"], state["step_in_epoch"])
        self.partitions = state["partitions"]  # the sample order is defined by it: never changes mid-run
