"""Hooks the tests install into the training workers (pipeline/train/hooks.py): each worker loads
this file by its path, so they reach Ray workers of any process on this machine.

- `sample_log(directory)`: each rank appends one JSON line per trained step to
  ``directory/rank<r>.jsonl``: the keys it trained on, its epoch, global step, pid and Ray node.
- `nan_at(step, run_name=None)`: the loss of global step ``step`` becomes NaN (on every rank), in
  every run or only in the run named ``run_name`` (a sweep's trial).
- `stall_once(step, rank, marker)`: rank ``rank`` stalls (for an hour) after global step ``step``,
  once: it first writes ``marker``, and a restarted worker that finds it trains on. Installed after
  `sample_log`, the step's line is in the log (with the pid to kill) when the rank stalls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.train.hooks import environment

HERE = str(Path(__file__).resolve())


def sample_log(directory: str | Path) -> dict[str, Any]:
    return {"factory": f"{HERE}:SampleLog", "args": {"directory": str(Path(directory).resolve())}}


def nan_at(step: int, run_name: str | None = None) -> dict[str, Any]:
    return {"factory": f"{HERE}:nan_loss", "args": {"step": step, "run_name": run_name}}


def stall_once(step: int, rank: int, marker: str | Path) -> dict[str, Any]:
    return {"factory": f"{HERE}:stall", "args": {"step": step, "at_rank": rank, "marker": str(Path(marker).resolve())}}


def env(*specs: dict[str, Any]) -> dict[str, str]:
    """The environment that installs ``specs`` in a run started from it (this process or a subprocess)."""
    return environment(*specs)


def install(monkeypatch: Any, *specs: dict[str, Any]) -> None:
    """Install ``specs`` in the runs this test starts (the driver hands them to every worker)."""
    for name, value in env(*specs).items():
        monkeypatch.setenv(name, value)


class SampleLog:
    def __init__(self, cfg: Any, rank: int, directory: str) -> None:
        import ray

        Path(directory).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(directory) / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115 - lives with the worker
        self.rank = rank
        self.node = ray.get_runtime_context().get_node_id()

    def on_step_end(self, epoch: int, step: int, keys: list[str]) -> None:
        self.file.write(json.dumps({"epoch": epoch, "step": step, "rank": self.rank, "pid": os.getpid(),
                                    "node": self.node, "keys": keys}) + "\n")


class _NanLoss:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_output(self, step: int, out: Any) -> Any:
        if step != self.step:
            return out
        return dataclasses.replace(out, loss=out.loss * float("nan"), recon=out.recon * float("nan"))


def nan_loss(cfg: Any, rank: int, step: int, run_name: str | None = None) -> _NanLoss | None:
    if run_name is not None and cfg.tracking.run_name != run_name:
        return None
    return _NanLoss(step)


class _Stall:
    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_step_end(self, epoch: int, step: int, keys: list[str]) -> None:
        if step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(3600)  # until the test kills this worker


def stall(cfg: Any, rank: int, step: int, at_rank: int, marker: str) -> _Stall | None:
    return _Stall(step, marker) if rank == at_rank else None
