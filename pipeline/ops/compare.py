"""`pipeline compare`: one row per run of an experiment, best validation -ELBO first."""

from __future__ import annotations

import math
from typing import Any

from pipeline.ops.naming import latent_label
from pipeline.runs.registry import champion_run_id
from pipeline.runs.store import search_experiment_runs


def _metric(metrics: dict[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return value if value is not None and math.isfinite(value) else None


def run_row(run, champion: str | None) -> dict[str, Any]:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    kind = params.get("model.latent.kind", tags.get("latent", "?"))
    variables, categories = params.get("model.latent.variables"), params.get("model.latent.categories")
    start, end = run.info.start_time, run.info.end_time
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "latent_kind": kind,
        "latent_size": f"{variables}x{categories}" if kind == "categorical" else str(variables),
        "latent": latent_label(kind, variables, categories),
        "epochs": int(params["train.epochs"]) if params.get("train.epochs", "").isdigit() else None,
        "val_loss": _metric(metrics, "val/loss"),
        "test_loss": _metric(metrics, "test/loss"),
        "test_nll_is": {k.removeprefix("test/nll_is_"): v for k, v in sorted(metrics.items())
                        if k.startswith("test/nll_is_k")},
        "samples_per_s": _metric(metrics, "perf/samples_per_s"),
        "duration_s": (end - start) / 1000 if start and end else None,
        "trigger": tags.get("trigger"),
        "status": run.info.status,
        "champion": run.info.run_id == champion,
        "data_version": (tags.get("dataset.manifest_sha256") or "")[:12],
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "sweep": _sweep_label(tags),
    }


def _sweep_label(tags: dict[str, str]) -> str | None:
    """A `pipeline sweep` parent: its trial count (and how many failed); a trial: its parent (and if it failed)."""
    if tags.get("sweep.role") == "parent":
        failed = tags.get("sweep.trials.failed")
        return f"parent of {tags.get('sweep.trials', '?')} trials" + (f", {failed} failed" if failed not in (None, "0")
                                                                      else "")
    if "sweep.trial_key" in tags:
        failed = " (failed)" if tags.get("sweep.outcome") == "failed" else ""
        return f"trial of {tags['mlflow.parentRunId'][:8]}{failed}"
    return None


def compare_rows(tracking_uri: str, experiment: str, model: str | None = None) -> list[dict[str, Any]]:
    """Rows for every run, sorted by val/loss (runs without one last); `model` names the registry entry."""
    champion = champion_run_id(tracking_uri, model or experiment)
    rows = [run_row(run, champion) for run in search_experiment_runs(tracking_uri, experiment)]
    names = {r["run_id"]: r["name"] for r in rows}
    for r in rows:  # a sweep's trial names its parent run
        if r["sweep"] and r["parent_run_id"] in names:
            r["sweep"] = r["sweep"].replace(r["parent_run_id"][:8], names[r["parent_run_id"]], 1)
    return sorted(rows, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table

    ks = sorted({k for r in rows for k in r["test_nll_is"]}, key=lambda k: int(k[1:]))
    sweeps = any(r.get("sweep") for r in rows)
    table = Table(title=title)
    for name in ["name", "latent", "epochs", "val/loss", "test/loss", *[f"test/nll_is_{k}" for k in ks],
                 "samples/s", "duration", "trigger", "status", "champion", *(["sweep"] if sweeps else [])]:
        table.add_column(name, justify="right" if name not in ("name", "latent", "trigger", "status", "sweep") else "left")
    for r in rows:
        table.add_row(r["name"], r["latent"], _fmt(r["epochs"]), _fmt(r["val_loss"]), _fmt(r["test_loss"]),
                      *[_fmt(r["test_nll_is"].get(k)) for k in ks], _fmt(r["samples_per_s"], 0),
                      f"{r['duration_s']:.0f} s" if r["duration_s"] is not None else "-", _fmt(r["trigger"]),
                      r["status"], "★" if r["champion"] else "", *([_fmt(r.get("sweep"))] if sweeps else []))
    return table
