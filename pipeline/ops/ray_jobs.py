"""A Ray Jobs client that works with Ray 2.60's token authentication, plus follow/list/logs/stop."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RUN_ID_PATTERN = re.compile(r"(?:MLflow run |run_id: )([0-9a-f]{32})")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(RuntimeError):
    """The cluster cannot be reached or refused the request; the message says what to do."""


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_ADDRESS; a bare host:port gets http:// (the Jobs API is HTTP on 8265)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise JobsError(f"{address} is a Ray Client address; job submission uses the dashboard: http://HEAD:8265")
    return address if "://" in address else f"http://{address}"


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def enable_token_auth() -> None:
    """Ray 2.60 clients send their token only with RAY_AUTH_MODE=token: set it when a token is at hand.

    Ray reads the mode into a cached config when it is first imported (the CLI imports Ray lazily,
    after this); in a process that imported Ray already (a notebook, a test session) the cache is
    re-read, as Ray's own ray.init does when it turns token auth on."""
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:
            sys.modules["ray._raylet"].Config.initialize("")


def connect(address: str | None):
    enable_token_auth()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    # Packaging the working dir logs every ignored file at INFO; what is excluded is in submit.EXCLUDES.
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError:
        problem = "refused this machine's token" if _token_available() else "requires a token"
        raise JobsError(
            f"the Ray cluster at {url} {problem}: set RAY_AUTH_TOKEN to the head's token (print it there "
            "with `ray get-auth-token`) or put it in ~/.ray/auth_token"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise JobsError(f"cannot reach the Ray Jobs API at {url}: {err}") from None


@dataclass
class JobRow:
    submission_id: str
    status: str
    entrypoint: str
    start: float | None
    end: float | None
    metadata: dict[str, str]

    @property
    def seconds(self) -> float | None:
        if not self.start:
            return None
        return ((self.end or time.time() * 1000) - self.start) / 1000


def list_jobs(client) -> list[JobRow]:
    rows = [JobRow(j.submission_id or j.job_id or "?", str(j.status), j.entrypoint, j.start_time, j.end_time,
                   dict(j.metadata or {})) for j in client.list_jobs()]
    return sorted(rows, key=lambda r: r.start or 0, reverse=True)


def find_run_id(logs: str) -> str | None:
    match = RUN_ID_PATTERN.search(logs)
    return match.group(1) if match else None


def follow(client, job_id: str, write: Callable[[str], None], poll_s: float = 1.0,
           timeout_s: float | None = None) -> str:
    """Stream the job's log to `write` until it ends; returns its final status."""
    printed = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            write(logs[printed:])
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def wait_for_run_id(client, job_id: str, timeout_s: float, poll_s: float = 1.0) -> tuple[str | None, str]:
    """The MLflow run id the job prints (or None), and the job's status when we stopped looking."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id))
        run_id = find_run_id(client.get_job_logs(job_id))
        if run_id or status in TERMINAL or time.monotonic() > deadline:
            return run_id, status
        time.sleep(poll_s)
