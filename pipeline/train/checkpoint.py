"""The checkpoint file: a `TrainState`'s state dict (train/state.py) plus the run's config,
loadable with weights_only=True.

`model` is always the model the run produced, the one to evaluate and log (with `train.ema` on,
the EMA's weights): readers that only want the model (artifacts, evaluate) read that key alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(directory: Path, state: Any, config: dict[str, Any]) -> Path:
    """Write ``state`` (a `TrainState`) and ``config`` (the run's, as plain data) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    torch.save(state.state_dict() | {"config": config}, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    # weights_only: a checkpoint from shared storage must not be able to run code on load.
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
