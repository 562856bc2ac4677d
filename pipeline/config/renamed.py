"""Renamed config keys: the table of old dotted keys and their new places, and their translation. A config
file, an override, a run's logged config.yaml or its MLflow params that still name an old key are read
under the new one (with its value translated where it changed), with a one-line notice per source."""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.config.keys import ConfigError, assign, lookup

# Keys renamed so that each says what it is: old dotted key -> its new place. A config file, an override
# or a run's logged config.yaml that still names an old key is read as the new one, with a one-line notice.
RENAMED_KEYS = {
    "data.binarize": "model.binarize",  # an option of the Bernoulli likelihood
    "model.latent.hard": "model.latent.estimator",  # true: straight-through, false: gumbel-softmax
    "model.latent.hard_from_step": "model.latent.straight_through_from_step",
    "model.latent.anneal_rate": "model.latent.tau_exponential.rate",
    "model.latent.anneal_every": "model.latent.tau_exponential.every",
    "model.latent.tau_steps": "model.latent.tau_cosine.steps",
}
_log = logging.getLogger(__package__)  # the notices are the config's: logger pipeline.config
_NOTICES: set[str] = set()  # each notice once per process (a sweep parses its config once per trial)


def renamed_value(old: str, value: Any) -> Any:
    """The value an old key's ``value`` is under its new name (model.latent.hard's boolean: an estimator)."""
    if old != "model.latent.hard":
        return value
    try:
        hard = TypeAdapter(bool).validate_python(value)
    except ValidationError:
        raise ConfigError(f"'{old}' (now {RENAMED_KEYS[old]}): expected true or false, got {value!r}") from None
    return "straight-through" if hard else "gumbel-softmax"


def _rename(old: str, value: Any) -> str:
    """``old -> new`` for the notice; with the values where they change (hard: true -> estimator: straight-through)."""
    new_value = renamed_value(old, value)
    if new_value is value:
        return f"{old} -> {RENAMED_KEYS[old]}"
    return f"{old}: {str(value).lower()} -> {RENAMED_KEYS[old]}: {new_value}"


def _notice(renames: list[str], source: str | None) -> None:
    """One line naming each old key read at its new place; each line once per process (a sweep parses
    its config once per trial)."""
    from pipeline import config  # the set as the package names it (`pipeline.config._NOTICES`, where it is reset)

    message = f"{source or 'config'}: deprecated config keys, read under their new names: " + ", ".join(renames)
    if message not in config._NOTICES:
        config._NOTICES.add(message)
        _log.warning(message)


def upgrade_keys(tree: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``tree`` (a run config's mapping) with every old key of `RENAMED_KEYS` moved to its new place, and
    one notice naming ``source`` (a file, a run) and the keys; a copy when anything moved. A tree that
    names a key both ways is refused: which value was meant is not known."""
    renames: list[str] = []
    for old, new in RENAMED_KEYS.items():
        found, value = lookup(tree, old.split("."))
        if not found:
            continue
        if lookup(tree, new.split("."))[0]:
            raise ConfigError(f"{source + ': ' if source else ''}{old} is the old name of {new}: give only {new}")
        if not renames:
            tree = copy.deepcopy(tree)
        *section, leaf = old.split(".")
        lookup(tree, section)[1].pop(leaf)
        assign(tree, new.split("."), renamed_value(old, value))
        renames.append(_rename(old, value))
    if renames:
        _notice(renames, source)
    return tree


def upgrade_override(old: str, value: Any) -> tuple[list[str], Any]:
    """An override ``old=value`` of an old key as the new key's: (its dotted path, its value), with a notice."""
    _notice([_rename(old, value)], "override")
    return RENAMED_KEYS[old].split("."), renamed_value(old, value)


def upgrade_params(params: dict[str, str]) -> dict[str, str]:
    """A run's logged MLflow params (strings) with each old key of `RENAMED_KEYS` also under its new name
    (a run logged before the rename), as a run logged now would name it."""
    out = dict(params)
    for old, new in RENAMED_KEYS.items():
        if old in params and new not in params:
            out[new] = str(renamed_value(old, params[old]))
    return out

