"""Checkpoint dict: everything needed to resume, loadable with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
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
) -> Path:
    """Write the checkpoint: training resumes at step `step_in_epoch` of epoch `epoch` (0-based).

    `partitions` fixes the sample order (see data/stream.py), so it travels with the weights.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "partitions": partitions,
        "grad_scaler": grad_scaler or {},
        "config": config,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_as_tensors(),
        },
    }
    path = directory / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    # weights_only: a checkpoint from shared storage must not be able to run code on load.
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def restore_rng(state: dict[str, Any]) -> None:
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    keys, pos = rng["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos)))


def _numpy_state_as_tensors() -> tuple[torch.Tensor, int]:
    _, keys, pos, *_ = np.random.get_state()
    return torch.from_numpy(keys.astype(np.int64)), int(pos)
