"""`pipeline submit`: turn CONFIG + overrides into a Ray job that runs jobs/train.py on the cluster."""

from __future__ import annotations

import os
import re
import secrets
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pipeline
from pipeline.config import load_config
from pipeline.data.retry import RetryPolicy

# Passed from the submitting shell to the job when set: where to log, how to reach storage.
# Values are never printed or logged; only the names are.
PASSED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)
# Never uploaded with the working directory (anchored: pipeline/data/ is code and must go).
EXCLUDES = ["/.venv/", "/.git/", "/data/", "/mlruns/", "/mlartifacts/", "/ray_results/", "*.db",
            "__pycache__/", ".pytest_cache/", "*.egg-info/"]
ENTRYPOINT_SCRIPT = "jobs/train.py"
TRIGGERS = ("manual", "cron", "new-data")


class SubmitError(ValueError):
    """The submission cannot be built from what was given; the message says why."""


@dataclass
class JobRequest:
    config: str
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    trigger: str = "manual"
    warm_start: bool = False
    working_dir: str | None = None
    tracking_uri: str | None = None
    entrypoint_cpus: float = 0.0
    entrypoint_gpus: float = 0.0
    extra_env: list[str] = field(default_factory=list)
    submission_id: str | None = None


@dataclass
class JobSubmission:
    kwargs: dict  # for JobSubmissionClient.submit_job
    passed_env: list[str]  # names only
    experiment: str


def project_root() -> Path:
    """The directory holding jobs/train.py: the cwd when it is a checkout, else the package's checkout."""
    for candidate in (Path.cwd(), Path(pipeline.__file__).resolve().parents[1]):
        if (candidate / ENTRYPOINT_SCRIPT).is_file():
            return candidate
    raise SubmitError(f"no {ENTRYPOINT_SCRIPT} here or beside the package: pass --working-dir")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "job"


def new_submission_id(experiment: str, trigger: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{slug(experiment)}-{trigger}-{stamp}-{secrets.token_hex(2)}"


def build_submission(req: JobRequest) -> JobSubmission:
    if req.trigger not in TRIGGERS:
        raise SubmitError(f"trigger must be one of {', '.join(TRIGGERS)}, not {req.trigger!r}")
    overrides = list(req.overrides)
    if req.name:
        overrides.append(f"tracking.run_name={req.name}")
    config = load_config(req.config, overrides)  # a bad config fails here, not on the cluster
    root = Path(req.working_dir).resolve() if req.working_dir else project_root()
    try:
        config_rel = Path(req.config).resolve().relative_to(root)
    except ValueError:
        raise SubmitError(f"{req.config} must be inside the uploaded working directory {root}") from None
    local_data = Path(config.data.url).expanduser()
    if "://" not in config.data.url and local_data.exists() and str(local_data.resolve()) != config.data.url:
        # A path that exists here is only meaningful on a cluster sharing this filesystem: make it absolute.
        overrides = [o for o in overrides if not o.startswith("data.url=")] + [f"data.url={local_data.resolve()}"]

    env = {name: os.environ[name] for name in (*PASSED_ENV, *req.extra_env) if os.environ.get(name)}
    if req.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = req.tracking_uri
    elif config.tracking.uri is None and "MLFLOW_TRACKING_URI" not in env:
        raise SubmitError("the job needs a tracking server it can reach: set MLFLOW_TRACKING_URI, "
                          "--tracking-uri or tracking.uri (a job's own sqlite file would be lost with its working dir)")

    submission_id = req.submission_id or new_submission_id(config.tracking.experiment, req.trigger)
    env["PIPELINE_SUBMISSION_ID"] = submission_id  # tagged on the run: which job made it
    args = ["python", ENTRYPOINT_SCRIPT, config_rel.as_posix()]
    for assignment in overrides:
        args += ["-o", assignment]
    args += ["--trigger", req.trigger] + (["--warm-start"] if req.warm_start else [])
    kwargs = dict(
        entrypoint=shlex.join(args),
        submission_id=submission_id,
        runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env},
        metadata={"pipeline.config": config_rel.as_posix(), "pipeline.trigger": req.trigger,
                  "pipeline.experiment": config.tracking.experiment, "pipeline.run_name": req.name or ""},
        entrypoint_num_cpus=req.entrypoint_cpus,
        entrypoint_num_gpus=req.entrypoint_gpus,
    )
    return JobSubmission(kwargs=kwargs, passed_env=sorted(env), experiment=config.tracking.experiment)


def _no_agent_yet(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "No available agent" in str(err)


def submit(client, submission: JobSubmission, *, agent_wait_s: float = 60.0) -> str:
    """Submit; a head that has just started answers "No available agent" for a few seconds: retry
    that (every 2 s, for up to ``agent_wait_s``); any other error is raised at once."""
    every_2s = RetryPolicy(retries=None, backoff_s=2.0, max_backoff_s=2.0, jitter=False, deadline_s=agent_wait_s)
    return every_2s.retrying(when=_no_agent_yet)(client.submit_job, **submission.kwargs)
