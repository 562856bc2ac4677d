"""The config's dotted keys (``train.epochs``) over its tree of sections: reading and setting one key
in a mapping of mappings, flattening a tree to them (MLflow params, the CLI's overrides), and ConfigError,
the error that names the key."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 10}} -> {"train.epochs": 10}: every leaf under its dotted key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def lookup(tree: Any, keys: list[str]) -> tuple[bool, Any]:
    """(found, value) of the dotted path ``keys`` in a mapping of mappings."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return False, None
        tree = tree[key]
    return True, tree


def assign(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set the dotted path ``keys`` in ``tree`` to ``value``, making the sections it passes through."""
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value
