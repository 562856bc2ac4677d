"""One trial of a sweep, inside Ray Tune: train (or continue) its child run, evaluate it once when
asked, and say how it ended; and how MLflow records a trial (its child run, complete or not).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import parse_config


def find_child(tracking_uri: str, experiment: str, parent_id: str, key: str):
    """The child run of ``parent_id`` for a trial key: a FINISHED one first, else the newest."""
    from pipeline.runs import store

    runs = store.runs_tagged(tracking_uri, experiment, {"mlflow.parentRunId": parent_id, "sweep.trial_key": key})
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs or [None])[0]


def is_evaluated(run, k: int | None) -> bool:
    return k is None or f"test/nll_is_k{k}" in run.data.metrics


def completed(child, k: int | None) -> bool:
    """A trial that needs nothing more: trained to the end, evaluated when asked, not given up on."""
    return (child is not None and child.info.status == "FINISHED" and is_evaluated(child, k)
            and child.data.tags.get("sweep.outcome") != "failed")


def _evaluate(run_id: str, k: int, tracking_uri: str) -> dict[str, float]:
    """`pipeline evaluate RUN_ID -k K` on the test split, as a Ray task holding the trial's CPUs."""
    from pipeline.evaluate.likelihood import evaluate_run

    return evaluate_run(run_id, split="test", importance_samples=k, tracking_uri=tracking_uri).metrics


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One Tune trial: train (or continue) the trial's child run, evaluate it once when asked, and
    say how it ended. Training failures that survived Ray Train's restarts end the trial as
    failed (not retried by Tune); anything else raises, and Tune restarts the trial, which then
    finds its child run and resumes it."""
    import ray

    from pipeline.evaluate.likelihood import EvaluationError
    from pipeline.runs import store
    from pipeline.train.trainer import TrainingError, train

    config = parse_config(spec["config"])
    uri, experiment, parent, key = spec["tracking_uri"], config.tracking.experiment, spec["parent"], spec["key"]
    child = find_child(uri, experiment, parent, key)
    if child is None or child.info.status != "FINISHED":
        if child is not None and child.data.tags.get("sweep.outcome") == "failed" and not spec["retry_failed"]:
            return {"outcome": "failed", "run_id": child.info.run_id, "reason": child.data.tags.get("sweep.failure")}
        try:
            train(config, trigger="sweep", resume_run_id=child.info.run_id if child is not None else None,
                  resume_reason="sweep resumed the trial", tags={
                      "mlflow.parentRunId": parent, "sweep.trial_key": key, "sweep.point": spec["point"],
                      "sweep.seed": str(spec["seed"]), "sweep.key": spec["sweep_key"]})
        except TrainingError as err:
            child = find_child(uri, experiment, parent, key)
            reason = str(err)
            if child is not None:
                store.set_run_tags(uri, child.info.run_id, {"sweep.outcome": "failed",
                                                            "sweep.failure": reason[:5000]})
            return {"outcome": "failed", "run_id": child.info.run_id if child else None, "reason": reason}
        child = find_child(uri, experiment, parent, key)
    run_id = child.info.run_id
    k = spec["evaluate_k"]
    if not is_evaluated(child, k):
        cpus = config.train.workers * config.train.cpus_per_worker
        try:
            # "DEFAULT": not inside the trial's own placement group (Tune's), which holds no CPU
            task = ray.remote(num_cpus=cpus)(_evaluate).options(scheduling_strategy="DEFAULT")
            ray.get(task.remote(run_id, k, uri))
        except Exception as err:  # noqa: BLE001 - EvaluationError or a task failure: the trial has no test figures
            cause = getattr(err, "cause", None) or err
            if not isinstance(cause, EvaluationError):
                raise
            reason = f"evaluation: {cause}"
            store.set_run_tags(uri, run_id, {"sweep.outcome": "failed", "sweep.failure": reason[:5000]})
            store.end_run(uri, run_id, failed=True)
            return {"outcome": "failed", "run_id": run_id, "reason": reason}
    store.set_run_tags(uri, run_id, {"sweep.outcome": "finished"})
    return {"outcome": "finished", "run_id": run_id}


def tune_trial(config: dict[str, Any]) -> dict[str, Any]:
    """The function Tune runs per trial: its spec is the grid value ``config["trial"]``."""
    return run_trial(config["trial"])
