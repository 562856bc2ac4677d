"""What a sweep ended with: each trial's outcome, per grid point the mean, standard deviation and n
of the trials' final figures, the parent run's metrics and CSV table, and the summary table.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from pipeline.ops.sweep.spec import POINT_WITHOUT_GRID, Trial

AGGREGATED = ("val/", "latent/", "test/")  # the final figures aggregated per grid point
NOT_AGGREGATED = re.compile(r"^val/kl_latent_\d+$")  # one KL per latent variable: too many to chart


@dataclass
class TrialOutcome:
    trial: Trial
    outcome: str  # finished | failed
    run_id: str | None
    reused: bool  # trained to the end (or given up on) by an earlier attempt: not trained again
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"point": self.trial.point, "seed": self.trial.seed, "key": self.trial.key, "run_id": self.run_id,
                "outcome": self.outcome, "reused": self.reused, "reason": self.reason}


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    experiment: str
    attempt: int
    outcomes: list[TrialOutcome]
    aggregates: dict[str, dict[str, dict[str, float]]]  # point -> metric -> {mean, sd, n}
    failed_by_point: dict[str, int]
    seconds: float

    @property
    def finished(self) -> int:
        return sum(o.outcome == "finished" for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(o.outcome == "failed" for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "attempt": self.attempt, "trials": [o.as_dict() for o in self.outcomes],
                "finished": self.finished, "failed": self.failed, "failed_by_point": self.failed_by_point,
                "aggregates": self.aggregates, "seconds": round(self.seconds, 1)}


def aggregate(values: list[float]) -> dict[str, float]:
    """mean, sample standard deviation (n - 1; only for n >= 2) and n."""
    out = {"mean": statistics.mean(values), "n": float(len(values))}
    if len(values) >= 2:
        out["sd"] = statistics.stdev(values)
    return out


def final_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The figures of a finished trial that the sweep aggregates (its runs' latest values)."""
    return {k: v for k, v in metrics.items()
            if k.startswith(AGGREGATED) and not NOT_AGGREGATED.match(k) and math.isfinite(v)}


def aggregates_by_point(outcomes: list[TrialOutcome]) -> dict[str, dict[str, dict[str, float]]]:
    points: dict[str, dict[str, list[float]]] = {}
    for o in outcomes:
        points.setdefault(o.trial.point, {})
        if o.outcome != "finished":
            continue
        for name, value in final_figures(o.metrics).items():
            points[o.trial.point].setdefault(name, []).append(value)
    return {point: {name: aggregate(values) for name, values in sorted(figures.items())}
            for point, figures in points.items()}


def metric_point(assignments: tuple[str, ...] | list[str]) -> str:
    """A grid point as a segment of an MLflow metric name (letters, digits, _ - . and spaces only):
    ("model.latent.kl=relaxed", "train.lr=0.001") -> "model.latent.kl-relaxed train.lr-0.001"."""
    if not assignments:
        return POINT_WITHOUT_GRID
    return " ".join(re.sub(r"[^\w.\- ]", "_", a.replace("=", "-", 1)) for a in assignments)


def parent_metrics(aggregates: dict[str, dict[str, dict[str, float]]], outcomes: list[TrialOutcome]) -> dict[str, float]:
    """sweep/<point>/<figure>/{mean,sd,n}, sweep/<point>/trials/{finished,failed}, sweep/trials/*."""
    metrics: dict[str, float] = {}
    segments = {o.trial.point: metric_point(o.trial.assignments) for o in outcomes}
    for point, figures in aggregates.items():
        segment = segments[point]
        for name, stats in figures.items():
            for stat, value in stats.items():
                metrics[f"sweep/{segment}/{name}/{stat}"] = value
        mine = [o for o in outcomes if o.trial.point == point]
        metrics[f"sweep/{segment}/trials/finished"] = sum(o.outcome == "finished" for o in mine)
        metrics[f"sweep/{segment}/trials/failed"] = sum(o.outcome == "failed" for o in mine)
    metrics["sweep/trials/total"] = len(outcomes)
    metrics["sweep/trials/finished"] = sum(o.outcome == "finished" for o in outcomes)
    metrics["sweep/trials/failed"] = sum(o.outcome == "failed" for o in outcomes)
    return metrics


def aggregates_table(aggregates: dict[str, dict[str, dict[str, float]]], failed: dict[str, int]) -> str:
    """One row per (grid point, figure): a CSV the MLflow UI shows as a table."""
    lines = ["point,figure,mean,sd,n,failed_trials"]
    for point, figures in aggregates.items():
        for name, stats in figures.items():
            sd = stats.get("sd")
            lines.append(f"\"{point}\",{name},{stats['mean']!r},{'' if sd is None else repr(sd)},"
                         f"{int(stats['n'])},{failed.get(point, 0)}")
        if not figures:
            lines.append(f"\"{point}\",,,,0,{failed.get(point, 0)}")
    return "\n".join(lines) + "\n"


def _cell(stats: dict[str, float] | None) -> str:
    if not stats:
        return "-"
    sd = stats.get("sd")
    spread = f" ± {sd:.2f}" if sd is not None else ""
    return f"{stats['mean']:.2f}{spread} ({int(stats['n'])})"


def render_summary(result: SweepResult):
    """A table per grid point: trials finished/failed and mean ± sd (n) of the main figures."""
    from rich.table import Table

    names = ["val/loss", "val/kl", "latent/perplexity", "val/cluster_acc"]
    seen = {name for figures in result.aggregates.values() for name in figures}
    names = [n for n in names if n in seen] + sorted(n for n in seen if n.startswith("test/")
                                                     and (n.endswith("/loss") or "/nll_" in n or "bits" in n))
    table = Table(title=f"sweep {result.parent_run_id} ({result.experiment}): mean ± sd (n)")
    for column in ["grid point", "finished", "failed", *names]:
        table.add_column(column, justify="left" if column == "grid point" else "right")
    for point, figures in result.aggregates.items():
        mine = [o for o in result.outcomes if o.trial.point == point]
        table.add_row(point, str(sum(o.outcome == "finished" for o in mine)), str(result.failed_by_point.get(point, 0)),
                      *[_cell(figures.get(name)) for name in names])
    return table
