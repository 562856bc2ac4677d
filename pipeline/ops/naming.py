"""Readable run names: <dataset>-<latent>-<UTC time>, so the MLflow compare view reads well."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from pipeline.config import RunConfig


def latent_label(kind: str, variables: int | str, categories: int | str | None) -> str:
    """categorical 20x10 -> 'cat20x10'; gaussian 50 -> 'gauss50'."""
    if kind == "categorical":
        return f"cat{variables}x{categories}"
    return f"gauss{variables}"


def dataset_label(url: str) -> str:
    """The last path segment of data.url ('s3://b/mnist/' -> 'mnist')."""
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", tail)


def default_run_name(config: RunConfig, now: datetime | None = None) -> str:
    latent = config.model.latent
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"{dataset_label(config.data.url)}-{latent_label(latent.kind, latent.variables, latent.categories)}-{stamp}"
