"""`pipeline ui`: the MLflow server as a child that ends with us.

`mlflow server` starts a dozen processes (uvicorn workers, huey consumers). A signal to the
parent alone leaves them running and holding the port, so the server gets a process group of
its own, and a SIGTERM, SIGINT or SIGHUP to `pipeline ui` is passed on to that whole group;
whatever is still alive after a grace period is killed. (Only a SIGKILL to `pipeline ui`
itself cannot be passed on.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM what is left of the group, then SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


def serve(cmd: list[str], *, grace_s: float = 15.0) -> int:
    """Run ``cmd`` in its own process group until it exits or we are asked to stop; returns its
    exit code (0 when it stopped because we were asked to)."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    stopped: list[int] = []

    def forward(signum: int, _frame) -> None:
        stopped.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code = proc.wait()
    finally:
        _end_group(proc.pid, grace_s)  # workers that outlive the server's main process
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped else code
