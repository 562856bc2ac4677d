"""The loop's one hook point: callbacks a caller installs into every worker, never part of the config.

A hook is an object with any of these methods:

- ``on_output(step, out) -> out``: after the forward pass of global step ``step``; may return a
  replaced output (its loss is what the step then minimises);
- ``on_step_end(epoch, step, keys)``: after the step, with the keys of the samples this rank trained.

Ray workers do not share the driver's process or environment, so hooks travel as plain data: a
`HookSpec` names a factory (``"package.module:name"`` or ``"/path/to/file.py:name"``) and its
keyword arguments. Each worker calls ``factory(cfg, rank, **args)``; a factory may return None
(no hook in this run). The driver reads the specs from ``$PIPELINE_TRAIN_HOOKS`` (a JSON list of
``{"factory": ..., "args": {...}}``), so a command started in a subprocess installs them too.

`pipeline encode` installs its hooks the same way, from ``$PIPELINE_ENCODE_HOOKS``
(pipeline/tokens/encode.py says what its factories are called with).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

HOOKS_ENV = "PIPELINE_TRAIN_HOOKS"

HookSpec = dict[str, Any]  # {"factory": "module:name" or "/file.py:name", "args": {...}}


def specs_from_environment(variable: str = HOOKS_ENV) -> list[HookSpec]:
    """The hook specs in ``$variable`` (none when unset)."""
    raw = os.environ.get(variable)
    return list(json.loads(raw)) if raw else []


def environment(*specs: HookSpec, variable: str = HOOKS_ENV) -> dict[str, str]:
    """{variable: ...} installing ``specs``: for ``os.environ``, a subprocess's env or monkeypatch."""
    return {variable: json.dumps(list(specs))}


class Hooks:
    """The installed hooks of one worker, called in order; no hooks: every call is a no-op."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks

    @classmethod
    def load(cls, specs: list[HookSpec], cfg: Any, rank: int) -> "Hooks":
        built = [build(spec, cfg, rank) for spec in specs]
        return cls([hook for hook in built if hook is not None])

    def on_output(self, step: int, out: Any) -> Any:
        for hook in self.hooks:
            if hasattr(hook, "on_output"):
                out = hook.on_output(step, out)
        return out

    def on_step_end(self, epoch: int, step: int, keys: list[str]) -> None:
        for hook in self.hooks:
            if hasattr(hook, "on_step_end"):
                hook.on_step_end(epoch, step, keys)


def build(spec: HookSpec, *args: Any) -> Any:
    """``factory(*args, **spec["args"])`` of one spec: a hook, or None."""
    return _factory(spec["factory"])(*args, **spec.get("args", {}))


def _factory(target: str) -> Any:
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        module_name = f"_train_hooks_{abs(hash(str(Path(where).resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, where)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)
