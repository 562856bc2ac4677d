"""One optimizer step under the configured precision: autocast, backward, grad norm, update.

fp32 and bf16 need no loss scaling; fp16 uses a gradient scaler, which itself skips the
updates whose scaled gradients overflow (normal while it finds its scale). So "non-finite"
means: the averaged gradient (fp32/bf16: identical on every rank after DDP's all-reduce),
or for fp16 the loss averaged over ranks — the same verdict on every rank either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.train.collectives import all_reduce

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    grad_norm: float
    nonfinite: bool  # the update was not applied: the loss/gradient was NaN or inf


class PrecisionStep:
    def __init__(self, precision: str, device: torch.device) -> None:
        self.device = device
        self.dtype = _DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> StepResult:
        """Backward, then the update unless the step is non-finite (never applied)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            grad_norm = _total_norm(model)
            if not np.isfinite(grad_norm):
                return StepResult(grad_norm, nonfinite=True)
            optimizer.step()
            return StepResult(grad_norm, nonfinite=False)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        grad_norm = _total_norm(model)
        if not _finite_everywhere(loss.detach()):
            self.scaler.update()
            return StepResult(grad_norm, nonfinite=True)
        self.scaler.step(optimizer)  # skips by itself when the scaled gradients overflowed
        self.scaler.update()
        return StepResult(grad_norm, nonfinite=False)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def _finite_everywhere(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss).all())])
    return bool(all_reduce(flag, loss.device, op=dist.ReduceOp.MIN).item())


def _total_norm(model: torch.nn.Module) -> float:
    """The global gradient norm (for non-finite detection and train/grad_norm). Not
    clip_grad_norm_(inf): that also rescales every gradient by 1.0."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
