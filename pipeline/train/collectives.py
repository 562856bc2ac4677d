"""The few collectives the loop needs, usable with or without an initialised process group.

Gloo reduces CPU tensors, NCCL only device tensors: values travel to the rank's device for
the reduction and come back to the CPU. Every rank must call each of these at the same point.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(values: torch.Tensor, device: torch.device, op: Any = None) -> torch.Tensor:
    """``values`` reduced over ranks (sum unless ``op``), on the CPU; unchanged in a single process."""
    if not distributed():
        return values
    values = values.to(device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM if op is None else op)
    return values.cpu()


def all_gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order."""
    if not distributed():
        return [value]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, value)
    return everyone
