"""Typed run configuration: YAML file + dotted CLI overrides -> pydantic models.

One room, four parts, each importing only those before it:

- keys.py: the dotted keys (``train.epochs``) over a config's tree, flattening to them, ConfigError;
- renamed.py: old keys -> new keys (RENAMED_KEYS) and their translation, with one-line notices;
- schema.py: the sections (data, model, model.latent, train, tracking) and RunConfig, with their checks;
- files.py: reading YAML files and their ``base:`` chains, overrides, parse_config/load_config, error text.

Import the names from here (``from pipeline.config import RunConfig, load_config``).
"""

from __future__ import annotations

from pipeline.config.files import apply_override, load_config, parse_config, read_config_tree
from pipeline.config.keys import ConfigError, flatten
from pipeline.config.renamed import _NOTICES, RENAMED_KEYS, renamed_value, upgrade_keys, upgrade_params
from pipeline.config.schema import (GRID_ARCHES, DataConfig, LatentConfig, ModelConfig, RunConfig, TauCosine,
                                    TauExponential, TrackingConfig, TrainConfig)

__all__ = [
    "GRID_ARCHES", "RENAMED_KEYS", "ConfigError", "DataConfig", "LatentConfig", "ModelConfig", "RunConfig",
    "TauCosine", "TauExponential", "TrackingConfig", "TrainConfig", "apply_override", "flatten", "load_config",
    "parse_config", "read_config_tree", "renamed_value", "upgrade_keys", "upgrade_params",
]
