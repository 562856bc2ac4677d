"""Killing what a test started, as a lost machine would."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def kill_session(session_id: int, timeout: float = 30) -> list[int]:
    """SIGKILL every process of a session (what a lost machine does to a driver); returns survivors."""
    def members() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == session_id:
                        pids.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return pids
    deadline = time.monotonic() + timeout
    while (pids := members()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return [pid for pid in members() if not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"]
