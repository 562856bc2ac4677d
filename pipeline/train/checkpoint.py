"""Checkpoint dict: everything needed to resume, loadable with weights_only=True.

`model` is always the model the run produced, the one to evaluate and log: with `train.ema` on,
the EMA weights. The weights the optimizer trains then travel as `online_model`, the EMA's
update count as `ema`. Readers that only want the model (artifacts, evaluate) read `model`;
the loop resumes from `training_weights(state)` and restores the EMA from `model`.
The schedules (learning rate, KL weight, temperature) are pure functions of `step`: the step is
their whole state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int,
    step_in_epoch: int,
    partitions: int,
    config: dict[str, Any],
    grad_scaler: dict[str, Any] | None = None,
    ema: Any | None = None,
) -> Path:
    """Write the checkpoint: training resumes at step `step_in_epoch` of epoch `epoch` (0-based).

    `partitions` fixes the sample order (see data/stream.py), so it travels with the weights.
    `ema` (a `train.step.WeightEMA`, or None): its weights become `model`, the trained ones `online_model`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict()
    state = {
        "model": weights if ema is None else ema.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "partitions": partitions,
        "grad_scaler": grad_scaler or {},
        "config": config,
    }
    if ema is not None:
        state["online_model"] = weights
        state["ema"] = ema.state_dict()
    path = directory / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    # weights_only: a checkpoint from shared storage must not be able to run code on load.
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def training_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights the optimizer was training (differs from `model` when the run keeps an EMA)."""
    return state.get("online_model", state["model"])


def restore_ema(ema: Any, state: dict[str, Any]) -> None:
    """The EMA as it was saved; a checkpoint without one (EMA switched on at resume) starts it
    from the trained weights."""
    if "online_model" in state:
        ema.load_state_dict(state["model"], state.get("ema", {}))
    else:
        ema.load_state_dict(state["model"], {"updates": 0})
