"""The sweep's definition: seeds x grid points, every trial's config resolved and checked up front,
and the hashes that identify them in MLflow.

- ``sweep.key`` (`SweepSpec.key`): a hash of the sweep's definition (resolved config, seeds, grid);
  running the same sweep again finds its parent run by it;
- ``sweep.trial_key`` (`Trial.key`): a hash of a trial's resolved config, without where it is logged
  and checkpointed; a trial's child run is found by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, load_config

POINT_WITHOUT_GRID = "base"


@dataclass(frozen=True)
class Trial:
    """One training run of the sweep: a grid point and a seed."""

    point: str  # "model.latent.estimator=straight-through,train.lr=0.001"; "base" without a grid
    assignments: tuple[str, ...]  # the point's overrides
    seed: int
    key: str  # sweep.trial_key: the hash of its resolved config
    config: RunConfig = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.point} seed={self.seed}"


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" or a range "0..4" (inclusive) -> seeds, each once, in the order given."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if ".." in part:
                low, high = (int(v) for v in part.split("..", 1))
                values = list(range(low, high + 1))
            else:
                values = [int(part)]
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected integers like 0,1,2 or a range 0..4") from None
        seeds += [s for s in values if s not in seeds]
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return seeds


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: "[128],[256, 128]" -> ["[128]", "[256, 128]"]."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(entries: list[str]) -> list[tuple[str, list[str]]]:
    """["train.lr=1e-3,3e-3", "model.hidden=[128],[256,128]"] -> [(key, values), ...] (values as YAML text)."""
    grid: list[tuple[str, list[str]]] = []
    for entry in entries:
        key, sep, values = entry.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {entry!r} must look like key.path=v1,v2")
        if key == "train.seed":
            raise ConfigError("--grid train.seed: seeds are given with --seeds")
        if key.startswith("tracking."):
            raise ConfigError(f"--grid {key}: every trial of a sweep logs to the same experiment and store")
        if any(key == k for k, _ in grid):
            raise ConfigError(f"--grid {key} given twice: list all its values in one --grid")
        split = _split_top_level(values)
        if any(not v for v in split) or len(set(split)) != len(split):
            raise ConfigError(f"--grid {entry!r}: empty or repeated value")
        grid.append((key, split))
    return grid


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _identity(config: RunConfig) -> dict[str, Any]:
    """What makes a training run what it is: the config without where it is logged and checkpointed."""
    tree = config.model_dump(mode="json")
    tree.pop("tracking", None)
    tree["train"].pop("storage", None)
    return tree


def _absolute(url: str) -> str:
    return url if "://" in url else str(Path(url).expanduser().resolve())


@dataclass
class SweepSpec:
    """The sweep as the user defined it, each trial's config resolved and checked up front."""

    config_path: str
    overrides: list[str]
    seeds: list[int]
    grid: list[tuple[str, list[str]]]
    base: RunConfig
    trials: list[Trial]

    @property
    def key(self) -> str:
        return _digest({"config": _identity(self.base), "seeds": self.seeds, "grid": self.grid})

    def definition(self) -> dict[str, Any]:
        return {"config": self.config_path, "overrides": self.overrides, "seeds": self.seeds,
                "grid": {key: values for key, values in self.grid}, "key": self.key,
                "points": sorted({t.point for t in self.trials}, key=[t.point for t in self.trials].index),
                "trials": [{"point": t.point, "seed": t.seed, "key": t.key} for t in self.trials]}


def build_spec(config_path: str, overrides: list[str], seeds: list[int], grid: list[tuple[str, list[str]]], *,
               tracking_uri: str | None = None) -> SweepSpec:
    """Every trial's config (file + overrides + its grid point + train.seed), or a ConfigError naming
    the override that does not fit. Local paths become absolute: trials run in other processes."""
    def _normalized(config: RunConfig) -> RunConfig:
        from pipeline.runs.store import resolve_tracking_uri

        config.data.url = _absolute(config.data.url)
        config.train.storage = _absolute(config.train.storage or "ray_results")
        config.tracking.uri = resolve_tracking_uri(tracking_uri, config=config.tracking.uri)
        return config

    base = _normalized(load_config(config_path, overrides))
    points: list[tuple[str, ...]] = [()]
    for key, values in grid:
        points = [(*p, f"{key}={v}") for p in points for v in values]
    trials = []
    for assignments in points:
        point = ",".join(assignments) or POINT_WITHOUT_GRID
        for seed in seeds:
            try:
                config = _normalized(load_config(config_path, [*overrides, *assignments, f"train.seed={seed}"]))
            except ConfigError as err:
                raise ConfigError(f"grid point {point}, seed {seed}: {err}") from None
            trials.append(Trial(point, assignments, seed, _digest(_identity(config)), config))
    keys = [t.key for t in trials]
    if len(set(keys)) != len(keys):
        raise ConfigError("two trials of this sweep train the same config (a grid value equal to another?)")
    return SweepSpec(config_path, list(overrides), seeds, grid, base, trials)
