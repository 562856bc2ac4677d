"""Reading a run config: YAML files and their ``base:`` chains (merged section by section), dotted
``key=value`` overrides, validation into a RunConfig, and the error text naming each bad key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.keys import ConfigError, assign
from pipeline.config.renamed import RENAMED_KEYS, upgrade_keys, upgrade_override
from pipeline.config.schema import RunConfig


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (3, 1e-3, [1, 2], true)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    dotted, raw = assignment.split("=", 1)
    dotted = dotted.strip()
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {assignment!r}: empty key segment")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if dotted in RENAMED_KEYS:  # an old key's override sets the new key (a file may already name it)
        keys, value = upgrade_override(dotted, value)
    try:
        assign(tree, keys, value)
    except ConfigError as err:
        raise ConfigError(f"override {err}") from None
    if keys == ["train", "workers"] and isinstance(value, int):
        tree["train"].pop("min_workers", None)  # a plain count means a fixed size, also over a logged range


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            section = _section_at(e["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else "?"
            lines.append(f"unknown key '{key}' (allowed here: {allowed})")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _section_at(path: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for key in path:
        field = model.model_fields.get(str(key))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def parse_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                 source: str | None = None) -> RunConfig:
    """A run config's mapping (``source`` names where it is from, in notices) plus dotted overrides, validated."""
    tree = upgrade_keys(tree, source)  # before the overrides: an override by the new name wins over an old key
    tree = copy.deepcopy(tree)  # overrides edit nested sections: the caller's tree stays as it was
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A YAML config file (after its ``base:`` chain, if any) plus dotted overrides, validated."""
    path = Path(path)
    tree = read_config_tree(path)
    try:
        return parse_config(tree, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def read_config_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping a config file describes. A file may name ``base: other.yaml`` (relative to its own
    folder): the base is read first and this file's keys override it, section by section (a list or
    a scalar replaces the base's value; a mapping merges into it)."""
    if not path.is_file():
        where = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: base configs form a cycle: {' -> '.join(map(str, (*chain, path.resolve())))}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (data, model, train, tracking)")
    base = tree.pop("base", None)
    tree = upgrade_keys(tree, str(path))  # each file's own keys: a file's old key overrides its base's new one
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must name another config file, got {base!r}")
    return _merged(read_config_tree(path.parent / base, (*chain, path.resolve())), tree)


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
