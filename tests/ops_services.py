"""Real services for the operations tests: a Ray head with the Jobs API and an `mlflow server`.

Both run in their own process group on free loopback ports with their own directories, so
they never clash with other clusters on the machine; teardown kills the whole group (never
`ray stop`, which would stop every Ray cluster of the user).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are chosen (ports chosen one
    after another can repeat, and one process then finds its second port taken by its first)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    return free_ports(1)[0]


def ports_for(flags: tuple[str, ...]) -> dict[str, int]:
    """A distinct free port per command-line flag (Ray refuses a node whose components share one)."""
    return dict(zip(flags, free_ports(len(flags))))


def _http_ok(url: str) -> bool:
    """The server answers (a 401 from a token-protected Ray dashboard counts: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError as err:
        return err.code == 401
    except OSError:
        return False


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not _http_ok(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left (gcs_server may ignore SIGTERM)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:  # children of the group may outlive the leader
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@dataclass
class Service:
    proc: subprocess.Popen
    url: str
    health: str
    log: Path
    scratch: list[str] = field(default_factory=list)  # directories removed after the process group


def spawn_ray_head(root: Path, num_cpus: int = 2) -> Service:
    """`ray start --head --block` on loopback with every port free; url is the Jobs API."""
    root.mkdir(parents=True, exist_ok=True)
    # Ray's socket paths must stay under 107 bytes: a short directory of our own, not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="ops-ray-", dir="/tmp")
    worker_base = random.randrange(20000, 30000, 200)
    flags = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port", "--node-manager-port",
             "--object-manager-port")
    ports = ports_for(flags) | {"--min-worker-port": worker_base, "--max-worker-port": worker_base + 199}
    dashboard = ports["--dashboard-port"]
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *[f"{k}={v}" for k, v in ports.items()]]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs run `python`: this venv's, as in an image
    log = root / "ray-head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    return Service(proc, url, f"{url}/api/version", log, [temp_dir])


def spawn_mlflow_server(root: Path, port: int | None = None) -> Service:
    """A real `mlflow server` (sqlite backend, proxied artifacts, 1 worker); `port` to bring one back."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = root / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    return Service(proc, url, f"{url}/health", log)


@contextmanager
def running(*services: Service, timeout_s: float = 120) -> Iterator[tuple[str, ...]]:
    """Wait until every service answers (they start in parallel); yields their URLs; kills them all."""
    try:
        for service in services:
            wait_http(service.health, service.proc, timeout_s, service.log)
        yield tuple(service.url for service in services)
    finally:
        for service in services:
            kill_group(service.proc)
            for scratch in service.scratch:
                shutil.rmtree(scratch, ignore_errors=True)
