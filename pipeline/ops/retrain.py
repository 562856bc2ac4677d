"""The policy `pipeline train` wraps around training: a readable run name and the warm start
before, the champion/challenger decision after (`train_run`)."""

from __future__ import annotations

import os
from typing import Any, Callable

from rich.console import Console

from pipeline.config import RunConfig, upgrade_params
from pipeline.ops import champion
from pipeline.ops.naming import default_run_name
from pipeline.runs import registry, store

console = Console(stderr=True, soft_wrap=True)  # messages name paths and URLs: never break them
SUBMISSION_ENV = "PIPELINE_SUBMISSION_ID"  # set by `pipeline submit` so the run names its Ray job


def model_name(config: RunConfig) -> str:
    return config.tracking.registered_model or config.tracking.experiment


def _same_architecture(tracking_uri: str, run_id: str, config: RunConfig) -> bool:
    logged = upgrade_params(store.get_run(tracking_uri, run_id).data.params)  # it may predate a renamed key
    # model.binarize (once data.binarize) chooses the targets, not the weights' shapes
    ours = {k: store.param_value(v) for k, v in config.flat().items()
            if k.startswith("model.") and k != "model.binarize"}
    return all(logged.get(k) == v for k, v in ours.items())


def prepare_run(config: RunConfig, *, warm_start: bool = False) -> RunConfig:
    """A copy of the config with a run name and, with `warm_start`, train.init_from = the champion."""
    config = config.model_copy(deep=True)
    if config.tracking.run_name is None:
        config.tracking.run_name = default_run_name(config)
    if warm_start and config.train.init_from is None:
        uri = store.resolve_tracking_uri(config=config.tracking.uri)
        incumbent = registry.model_version_by_alias(uri, model_name(config), registry.CHAMPION)
        if incumbent is None:
            console.print(f"warm start: no '{registry.CHAMPION}' of model '{model_name(config)}' yet; training from scratch")
        elif not _same_architecture(uri, incumbent.run_id, config):
            console.print(f"warm start: champion v{incumbent.version} has another architecture; training from scratch")
        else:
            config.train.init_from = f"models:/{model_name(config)}/{incumbent.version}"
            console.print(f"warm start from {config.train.init_from} (run {incumbent.run_id})")
    return config


def after_training(config: RunConfig, result: Any) -> champion.Decision | None:
    """Tag the run (validation data, job), register its model, decide on `champion` (on the declared
    metric, champion.py; the decision and why are printed and tagged on the run). Never fails the
    run: a step that fails is a warning on the console and, where MLflow can take it, on the run
    (`champion.decision=registry-failed`, `champion.reason`), so a promotion that did not happen is seen."""
    from pipeline.data import read_manifest
    from pipeline.train.trainer import absolute_url

    tags = {}
    if os.environ.get(SUBMISSION_ENV):
        tags["ray.submission_id"] = os.environ[SUBMISSION_ENV]
    if config.train.init_from:
        tags["warm_start.from"] = config.train.init_from
    try:
        # the champion comparison key: runs validated on the same shards compare, whatever they trained on
        tags["dataset.val_sha256"] = champion.val_data_id(read_manifest(absolute_url(config.data.url)))
        store.set_run_tags(result.tracking_uri, result.run_id, tags)
        if not config.tracking.register_model:
            return None
        decision = champion.register_and_decide(result.tracking_uri, result.run_id, model_name(config))
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; say what went wrong, and where
        reason = f"model registry step failed, champion unchanged: {err}"
        console.print(f"[yellow]warning:[/] {reason}")
        try:
            store.set_run_tags(result.tracking_uri, result.run_id,
                               {"champion.decision": "registry-failed", "champion.reason": reason[:5000]})
        except Exception as tag_err:  # noqa: BLE001 - MLflow itself is unreachable: the warning is all we have
            console.print(f"[yellow]warning:[/] could not tag run {result.run_id} either: {tag_err}")
        return None
    print(decision.line())
    return decision


def train_run(config: RunConfig, *, resume_run_id: str | None = None, warm_start: bool = False,
              address: str | None = None, trigger: str = "manual",
              on_trained: Callable[[Any], None] = lambda result: None) -> tuple[RunConfig, Any]:
    """Train one run with the policy around it: a new run (not a resumed one) gets a readable name and,
    with ``warm_start``, the champion's weights (`prepare_run`); ``on_trained(result)`` is told as soon as
    training ends; then the model is registered and 'champion' moves only to a better one
    (`after_training`, which never fails the run). Returns the config trained and the trainer's result;
    `TrainingError` and `ConfigError` come through."""
    from pipeline.train.trainer import train

    if resume_run_id is None:
        config = prepare_run(config, warm_start=warm_start)
    result = train(config, address=address, resume_run_id=resume_run_id, trigger=trigger)
    on_trained(result)
    after_training(config, result)
    return config, result
