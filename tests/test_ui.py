"""The MLflow UI served by `pipeline ui`, opened in headless Chromium: the runs page lists our runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops_runs import make_run
from ops_services import Service, free_port, running, wait_http
from pipeline.runs import store

EXPERIMENT = "ops-ui"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("headless Chromium is needed: apt-get install -y chromium (.ci/run installs it)")
    return found


def browse(url: str, profile: Path, *extra: str, budget_ms: int = 20000) -> subprocess.CompletedProcess:
    """One headless Chromium visit, fresh profile; virtual time lets the single-page app render."""
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           f"--virtual-time-budget={budget_ms}", *extra, url],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_mlflow_ui_lists_the_runs(tmp_path, tracking_uri):
    uri = tracking_uri
    names = ["digits-cat2x3-ui-first", "digits-cat2x3-ui-second"]
    for seed, name in enumerate(names):
        make_run(uri, EXPERIMENT, name, val_loss=100.0 - seed, seed=seed)
    experiment_id = store.experiment_id(uri, EXPERIMENT)

    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--tracking-uri", uri],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    server = Service(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/health", log)
    with running(server) as (base,):
        page = f"{base}/#/experiments/{experiment_id}/runs"
        screenshot = tmp_path / "mlflow-ui-runs.png"
        dom = ""
        for attempt in range(4):  # the first visit can outrun the server's first page build
            screenshot.unlink(missing_ok=True)
            # one visit: the rendered DOM on stdout and a screenshot of the same page
            dom = browse(page, tmp_path / f"profile-{attempt}", "--dump-dom", f"--screenshot={screenshot}").stdout
            if all(name in dom for name in names):
                break
            time.sleep(2)
        assert all(name in dom for name in names), dom[-3000:]
        assert screenshot.is_file() and screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}")


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by parent links in /proc), whatever its session."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_ui_stopped_by_a_signal_to_its_pid_ends_every_server_process(tmp_path, sig):
    """SIGTERM (or SIGINT) to `pipeline ui`'s pid alone: the mlflow server and all its workers end
    and the port is free again."""
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--tracking-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    server = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 240, log)
        server = sorted(_descendants(proc.pid))
        assert len(server) >= 3, server  # mlflow server, its uvicorn worker, huey consumers...
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 15  # `pipeline ui` returns once its group is gone: these end with it
        while (left := [pid for pid in server if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"left running after {sig.name}: {left}"
        assert code == 0, log.read_text()[-2000:]
        with socket.socket() as sock:
            # SO_REUSEADDR: the closed server's connections may linger in TIME_WAIT; a listener would
            # still make the bind fail on Linux.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # nothing holds the port
    finally:
        for pid in [proc.pid, *server]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
