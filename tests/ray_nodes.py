"""A real Ray cluster of several nodes on this machine: one `ray start --block` process per node.

Each node is its own raylet with its own resources, temp dir and ports, as Ray tests itself.
The nodes use the machine's own (non-loopback) address: a worker node joining a head
advertised on 127.0.0.1 is rewritten to that address by Ray and cannot register. Token
authentication (Ray's default) is on; every node and client here carries RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ops_services import BIN, kill_group, ports_for


def node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


_NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
               "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
_HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")


def _processes() -> dict[int, tuple[int, int, str]]:
    """Every process on the machine: pid -> (parent pid, process group, command name)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(rest[1]), int(rest[2]), name)
            except (OSError, ValueError):
                continue
    return found


@dataclass
class Node:
    proc: subprocess.Popen  # `ray start --block`: leader of the node's process group
    log: Path
    temp_dir: str

    def raylet_pid(self) -> int:
        """The raylet of this node (in the `ray start` process's group)."""
        for pid, (_, group, name) in _processes().items():
            if group == self.proc.pid and name == "raylet":
                return pid
        raise LookupError(f"no raylet in the process group of node {self.proc.pid}")

    def _members(self) -> set[int]:
        """The node's processes: its process group and their descendants (Ray workers get process
        groups of their own, under the raylet)."""
        processes = _processes()
        members = {pid for pid, (_, group, _) in processes.items() if group == self.proc.pid}
        while children := {pid for pid, (parent, _, _) in processes.items() if parent in members} - members:
            members |= children
        return members

    def owns(self, pid: int) -> bool:
        return pid in self._members()

    def kill(self) -> None:
        """What losing the machine does: SIGKILL the node's raylet and every process on the node.

        Killing only the raylet is not enough to stop a node's training workers promptly: they
        keep training over their direct gloo connections until the node is declared dead (seen
        here: ~150 steps later), and a short run can finish before that.
        """
        for pid in self._members():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Cluster:
    address: str  # GCS address, what `pipeline train --address` takes
    env: dict[str, str]  # environment for clients of this cluster
    head: Node
    workers: list[Node] = field(default_factory=list)

    def nodes(self) -> list[dict]:
        """The alive nodes as the GCS sees them, {"id", "cpus"} each (asked from a separate client
        process: the test process may hold another cluster); [] while the GCS does not answer."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps("
                "[{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes() if n['Alive']]))"
                ) % self.address
        out = subprocess.run([str(BIN / "python"), "-c", code], env=self.env, capture_output=True, text=True,
                             timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (alive := len(self.nodes())) != count:
            if time.monotonic() > deadline:
                logs = "\n".join(node.log.read_text()[-1500:] for node in [self.head, *self.workers])
                raise TimeoutError(f"{alive} of {count} Ray nodes alive after {timeout} s:\n{logs}")
            time.sleep(1)


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextmanager
def ray_cluster_of_nodes(root: Path, worker_cpus: tuple[int, ...] = (1, 1), head_cpus: int = 0,
                         env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A head (no CPUs for training by default) and one worker node per entry of ``worker_cpus``."""
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in (env or os.environ).items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    ip, ports = node_ip(), ports_for(_HEAD_PORTS + _NODE_PORTS)
    port = ports["--port"]
    ray = str(BIN / "ray")
    # Socket paths must stay under 107 bytes: short temp dirs of our own, one per node.
    head_dir = tempfile.mkdtemp(prefix="rn-head-", dir="/tmp")
    head_cmd = [ray, "start", "--head", "--block", f"--node-ip-address={ip}", f"--num-cpus={head_cpus}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                f"--temp-dir={head_dir}", *[f"{flag}={value}" for flag, value in ports.items()]]
    head = Node(_start(head_cmd, root / "head.log", env), root / "head.log", head_dir)
    cluster = Cluster(f"{ip}:{port}", env, head)
    try:
        cluster.wait_for_nodes(1)
        for index, cpus in enumerate(worker_cpus):
            temp_dir = tempfile.mkdtemp(prefix=f"rn-w{index}-", dir="/tmp")
            cmd = [ray, "start", "--block", f"--address={cluster.address}", f"--node-ip-address={ip}",
                   f"--num-cpus={cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                   *[f"{flag}={value}" for flag, value in ports_for(_NODE_PORTS).items()]]
            log = root / f"worker{index}.log"
            cluster.workers.append(Node(_start(cmd, log, env), log, temp_dir))
        cluster.wait_for_nodes(1 + len(worker_cpus))
        yield cluster
    finally:
        for node in [*cluster.workers, cluster.head]:
            kill_group(node.proc)
        for node in [*cluster.workers, cluster.head]:
            subprocess.run(["rm", "-rf", node.temp_dir], check=False)
