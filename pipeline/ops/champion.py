"""Champion/challenger: register a run's model and move the `champion` alias only to a better one.

"Better" means a lower value of one declared metric, the un-relaxed -ELBO on the validation split:
`val/loss_onehot` for categorical latents (one one-hot posterior sample and the analytic KL, whichever
estimator trained the run; a Gumbel-Softmax run's `val/loss` is the relaxed -ELBO, another and
usually lower figure), `val/loss` for other latents (which relax nothing). Two runs are compared only
when that figure means the same for both:

- the same validation data: `dataset.val_sha256` (the validation shards' hashes, so adding training
  shards keeps runs comparable) when both runs carry it, else `dataset.manifest_sha256`;
- the same likelihood: params `model.likelihood` and, for bernoulli, `model.binarize` (`data.binarize` in
  runs logged before it moved).

Otherwise the decision is `not-comparable` and its reason names what differs. The decision, its
reason, the metric and both figures are tagged on the challenger run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import upgrade_params
from pipeline.runs import registry
from pipeline.runs.registry import CHAMPION
from pipeline.runs.store import get_run, set_run_tags

ONEHOT_METRIC = "val/loss_onehot"
METRIC = "val/loss"


@dataclass
class Decision:
    model: str
    version: str
    run_id: str
    promoted: bool
    # first | promoted | kept | not-comparable | forced | already-champion | no-metric
    # (after_training tags `registry-failed` when this step raised)
    decision: str
    reason: str
    metric: str  # the declared metric compared, e.g. val/loss_onehot
    challenger_value: float | None
    champion_value: float | None = None
    champion_metric: str | None = None
    champion_version: str | None = None
    champion_run_id: str | None = None

    def as_tags(self) -> dict[str, Any]:
        tags = {"champion.decision": self.decision, "champion.reason": self.reason, "champion.metric": self.metric,
                "registry.model": self.model, "registry.version": self.version}
        if self.challenger_value is not None:
            tags["champion.challenger_value"] = f"{self.challenger_value:.6f}"
        if self.champion_value is not None:
            tags["champion.incumbent_value"] = f"{self.champion_value:.6f}"
        if self.champion_metric is not None and self.champion_metric != self.metric:
            tags["champion.incumbent_metric"] = self.champion_metric
        if self.champion_version is not None:
            tags["champion.incumbent_version"] = self.champion_version
            tags["champion.incumbent_run_id"] = self.champion_run_id or ""
        return tags

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"champion: {self.decision} — {self.model} v{self.version}: {self.reason}"


def val_data_id(manifest: Any) -> str:
    """sha256 over the validation split's shard hashes: which data val/loss was measured on."""
    shards = manifest.splits["val"].shards
    return hashlib.sha256("\n".join(f"{s.path}:{s.sha256}" for s in shards).encode()).hexdigest()


def declared_metric(run) -> str:
    """The run's un-relaxed -ELBO on val: `val/loss_onehot` for a categorical latent, else `val/loss`."""
    return ONEHOT_METRIC if run.data.params.get("model.latent.kind") == "categorical" else METRIC


def _value(run, metric: str) -> float | None:
    value = run.data.metrics.get(metric)
    return value if value is not None and math.isfinite(value) else None


def _same_validation_data(a, b) -> tuple[bool, str]:
    """Whether challenger `a` and champion `b` were validated on the same data, and what each names."""
    ta, tb = a.data.tags, b.data.tags
    key = "dataset.val_sha256" if "dataset.val_sha256" in ta and "dataset.val_sha256" in tb else "dataset.manifest_sha256"
    same = ta.get(key) is not None and ta.get(key) == tb.get(key)
    return same, f"{key} {str(ta.get(key))[:12]} here, {str(tb.get(key))[:12]} for the champion"


def _same_likelihood(a, b) -> tuple[bool, str]:
    """The likelihood the figure is measured under: model.likelihood, and the binarization of a bernoulli one."""
    pa, pb = upgrade_params(a.data.params), upgrade_params(b.data.params)  # either may predate a renamed key
    keys = ["model.likelihood"]
    if pa.get("model.likelihood") == pb.get("model.likelihood") == "bernoulli":
        keys.append("model.binarize")
    for key in keys:
        if pa.get(key) != pb.get(key):
            return False, f"{key} {pa.get(key)} here, {pb.get(key)} for the champion"
    return True, ""


def register_and_decide(tracking_uri: str, run_id: str, model: str, *, force: bool = False) -> Decision:
    """Register the run's model (once) and move `champion` to it if it beats the current champion
    on the declared metric, measured on the same validation data under the same likelihood."""
    run = get_run(tracking_uri, run_id)
    metric = declared_metric(run)
    challenger = _value(run, metric)
    existing = registry.model_versions_of_run(tracking_uri, model, run_id)
    version = (existing[0] if existing else registry.register_model_version(
        tracking_uri, model, run_id, tags={"metric": metric, "metric_value": challenger,
                                           "val_loss": run.data.metrics.get(METRIC),
                                           "dataset.manifest_sha256": run.data.tags.get("dataset.manifest_sha256")})
               ).version
    version = str(version)
    decision = Decision(model, version, run_id, False, "kept", "", metric, challenger)
    incumbent = registry.model_version_by_alias(tracking_uri, model, CHAMPION)

    if incumbent is not None:
        champ_run = get_run(tracking_uri, incumbent.run_id)
        decision.champion_version, decision.champion_run_id = str(incumbent.version), incumbent.run_id
        decision.champion_metric = declared_metric(champ_run)
        decision.champion_value = _value(champ_run, decision.champion_metric)
    if incumbent is not None and incumbent.run_id == run_id:
        decision.decision, decision.reason, decision.promoted = "already-champion", "this run is the champion", True
    elif force:
        decision.decision, decision.reason, decision.promoted = "forced", "promoted by hand (--force)", True
    elif challenger is None:
        decision.decision, decision.reason = "no-metric", f"the run has no finite {metric}"
    elif incumbent is None:
        decision.decision, decision.reason, decision.promoted = "first", "no champion yet", True
    else:
        champion = f"champion v{incumbent.version}"
        same_data, data_detail = _same_validation_data(run, champ_run)
        same_likelihood, likelihood_detail = _same_likelihood(run, champ_run)
        force_hint = "; use `pipeline promote --force` to replace it anyway"
        if not same_data:
            decision.decision = "not-comparable"
            decision.reason = f"{champion} was validated on other data ({data_detail}){force_hint}"
        elif not same_likelihood:
            decision.decision = "not-comparable"
            decision.reason = f"{champion} was measured under another likelihood ({likelihood_detail}){force_hint}"
        elif decision.champion_value is None:
            decision.decision = "not-comparable"
            decision.reason = f"{champion} has no finite {decision.champion_metric}{force_hint}"
        else:
            named = metric if decision.champion_metric == metric else f"{metric} vs its {decision.champion_metric}"
            if challenger < decision.champion_value:
                decision.decision, decision.promoted = "promoted", True
                decision.reason = f"{named}: {challenger:.4f} < {champion} {decision.champion_value:.4f}"
            else:
                decision.reason = f"{named}: {challenger:.4f} >= {champion} {decision.champion_value:.4f}"

    if decision.promoted and decision.decision != "already-champion":
        registry.set_model_alias(tracking_uri, model, CHAMPION, version)
    set_run_tags(tracking_uri, run_id, decision.as_tags())
    return decision
