"""Champion/challenger: register a run's model and move the `champion` alias only to a better one.

"Better" means a lower `val/loss` (-ELBO) on the same validation data. Runs carry
`dataset.val_sha256` (the validation shards' hashes, so adding training shards keeps runs
comparable) and always `dataset.manifest_sha256`; figures from different validation data
are never compared. The decision and both figures are tagged on the challenger run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.ops import tracking
from pipeline.train.tracking import get_run

CHAMPION = "champion"


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
    challenger_val_loss: float | None
    champion_val_loss: float | None = None
    champion_version: str | None = None
    champion_run_id: str | None = None

    def as_tags(self) -> dict[str, Any]:
        tags = {"champion.decision": self.decision, "champion.reason": self.reason,
                "registry.model": self.model, "registry.version": self.version}
        if self.challenger_val_loss is not None:
            tags["champion.challenger_val_loss"] = f"{self.challenger_val_loss:.6f}"
        if self.champion_val_loss is not None:
            tags["champion.incumbent_val_loss"] = f"{self.champion_val_loss:.6f}"
        if self.champion_version is not None:
            tags["champion.incumbent_version"] = self.champion_version
            tags["champion.incumbent_run_id"] = self.champion_run_id or ""
        return tags

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def val_data_id(manifest: Any) -> str:
    """sha256 over the validation split's shard hashes: which data val/loss was measured on."""
    shards = manifest.splits["val"].shards
    return hashlib.sha256("\n".join(f"{s.path}:{s.sha256}" for s in shards).encode()).hexdigest()


def _val_loss(run) -> float | None:
    value = run.data.metrics.get("val/loss")
    return value if value is not None and math.isfinite(value) else None


def _same_validation_data(a, b) -> tuple[bool, str]:
    ta, tb = a.data.tags, b.data.tags
    key = "dataset.val_sha256" if "dataset.val_sha256" in ta and "dataset.val_sha256" in tb else "dataset.manifest_sha256"
    same = ta.get(key) is not None and ta.get(key) == tb.get(key)
    return same, f"{key} {str(ta.get(key))[:12]} vs {str(tb.get(key))[:12]}"


def register_and_decide(tracking_uri: str, run_id: str, model: str, *, force: bool = False) -> Decision:
    """Register the run's model (once) and move `champion` to it if it beats the current champion."""
    run = get_run(tracking_uri, run_id)
    existing = tracking.model_versions_of_run(tracking_uri, model, run_id)
    version = (existing[0] if existing else tracking.register_model_version(
        tracking_uri, model, run_id, tags={"val_loss": run.data.metrics.get("val/loss"),
                                           "dataset.manifest_sha256": run.data.tags.get("dataset.manifest_sha256")})
               ).version
    version = str(version)
    challenger = _val_loss(run)
    decision = Decision(model, version, run_id, False, "kept", "", challenger)
    incumbent = tracking.model_version_by_alias(tracking_uri, model, CHAMPION)

    if incumbent is not None:
        champ_run = get_run(tracking_uri, incumbent.run_id)
        decision.champion_version, decision.champion_run_id = str(incumbent.version), incumbent.run_id
        decision.champion_val_loss = _val_loss(champ_run)
    if incumbent is not None and incumbent.run_id == run_id:
        decision.decision, decision.reason, decision.promoted = "already-champion", "this run is the champion", True
    elif force:
        decision.decision, decision.reason, decision.promoted = "forced", "promoted by hand (--force)", True
    elif challenger is None:
        decision.decision, decision.reason = "no-metric", "the run has no finite val/loss"
    elif incumbent is None:
        decision.decision, decision.reason, decision.promoted = "first", "no champion yet", True
    else:
        same, detail = _same_validation_data(run, champ_run)
        if not same:
            decision.decision = "not-comparable"
            decision.reason = f"champion was validated on other data ({detail}); use `pipeline promote --force`"
        elif decision.champion_val_loss is None or challenger < decision.champion_val_loss:
            decision.decision, decision.promoted = "promoted", True
            decision.reason = f"val/loss {challenger:.4f} < champion v{incumbent.version} {decision.champion_val_loss}"
        else:
            decision.reason = f"val/loss {challenger:.4f} >= champion v{incumbent.version} {decision.champion_val_loss:.4f}"

    if decision.promoted and decision.decision != "already-champion":
        tracking.set_model_alias(tracking_uri, model, CHAMPION, version)
    tracking.set_run_tags(tracking_uri, run_id, decision.as_tags())
    return decision


def champion_run_id(tracking_uri: str, model: str) -> str | None:
    incumbent = tracking.model_version_by_alias(tracking_uri, model, CHAMPION)
    return None if incumbent is None else incumbent.run_id
