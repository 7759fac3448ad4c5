"""A real Ray cluster on this machine for tests and benchmarks: a head node and worker nodes, each
a `ray start --block` process that this code started and stops by its pid (never `ray stop`,
which would stop every Ray cluster of the machine's user).

Addresses: Ray replaces 127.0.0.1 by the host's routable address (services.resolve_ip_for_localhost),
so the head listens on 127.0.0.2 and each worker on 127.0.0.3+: other loopback addresses, which
Ray takes as given. Nothing leaves the loopback range. Ports are chosen free; the object store
gets Ray's minimum (80 MB), so several nodes fit on a small machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """n different ports the OS says are free now. Held open together while they are chosen: one
    at a time, the OS may hand the same port out twice (the dashboard and a node's agent once got
    the same one, and the dashboard failed with "address already in use")."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env() -> dict[str, str]:
    """The nodes' environment, which each job's entrypoint inherits: the venv's bin NOT on PATH
    (nodes started as .venv/bin/ray, as a user would without activating the venv: the entrypoint
    must find tunejob by the server's interpreter, issue 35), no usage reporting; a dead node seen
    in ~5 s (5 failed checks 1 s apart; a dead raylet refuses at once) instead of Ray's ~15 s, with
    checks that allow 3 s on a busy machine."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = dict(os.environ, PATH=path, RAY_USAGE_STATS_ENABLED="0",
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="3000", RAY_health_check_failure_threshold="5")
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayCluster:
    temp_dir: Path
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> its `ray start --block`
    _next_ip: int = 3

    @property
    def address(self) -> str:
        """The job API (the head's dashboard): what `tunejob serve --ray-address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], agent_port: int | None = None, env: dict | None = None) -> None:
        log = (self.temp_dir / f"{name}.log").open("ab")
        agent_port = agent_port or free_ports(1)[0]
        self.nodes[name] = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--object-store-memory", "80000000",
                                             "--dashboard-agent-listen-port", str(agent_port), *args],
                                            stdout=log, stderr=subprocess.STDOUT, env={**ray_env(), **(env or {})})

    def start_head(self, cpus: int, resources: dict | None = None) -> None:
        self.gcs_port, self.dashboard_port, client_port, agent_port = free_ports(4)
        self._start("head", ["--head", "--node-ip-address", "127.0.0.2", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true", "--ray-client-server-port",
                             str(client_port), "--temp-dir", str(self.temp_dir / "ray"), "--num-cpus", str(cpus),
                             "--resources", json.dumps(resources or {})], agent_port)

    def add_node(self, name: str, cpus: int, resources: dict | None = None, gpus: list[int] | None = None) -> None:
        """`gpus`: the GPU ids this node owns (its CUDA_VISIBLE_DEVICES; bench/ray_train_gpu.py), so two
        nodes on one machine do not both claim every GPU."""
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        gpu_args = ["--num-gpus", str(len(gpus))] if gpus is not None else []
        self._start(name, ["--address", f"127.0.0.2:{self.gcs_port}", "--node-ip-address", ip, "--num-cpus", str(cpus),
                           "--resources", json.dumps(resources or {}), *gpu_args],
                    env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus is not None else None)

    def wait_ready(self, nodes: int, timeout: float = 120) -> None:
        """Until the job API answers and `nodes` nodes are alive."""
        from ray.util.state import list_nodes

        deadline = time.time() + timeout
        while True:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
            try:
                if len([n for n in list_nodes(address=self.address) if n.state == "ALIVE"]) >= nodes:
                    return
            except Exception:  # the dashboard is still starting
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the Ray cluster did not have {nodes} nodes within {timeout:.0f} s:\n{self.log('head')[-3000:]}")
            time.sleep(1)

    def log(self, name: str) -> str:
        return (self.temp_dir / f"{name}.log").read_text(errors="replace")

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the node's raylet (the node dies: `ray start --block` then ends the rest)."""
        raylet = next(p for p in psutil.Process(self.nodes[name].pid).children(recursive=True) if p.name() == "raylet")
        raylet.kill()
        self.nodes[name].wait(timeout=60)
        return raylet.pid

    def stop_node(self, name: str, tree: list | None = None) -> None:
        """SIGTERM the node (unless stop() already did: `tree` given), wait, kill what outlived it."""
        signalled = tree is not None
        tree = self._tree(name) if tree is None else tree
        proc = self.nodes.pop(name)
        if proc.poll() is None:
            if not signalled:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node's processes
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in tree:  # anything of this node that outlived it
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        workers = [n for n in self.nodes if n != "head"]
        trees = {name: self._tree(name) for name in workers}  # before any exits: its children are then re-parented
        for name in workers:  # all at once: each takes seconds to wind down, and they do it side by side
            if self.nodes[name].poll() is None:
                self.nodes[name].send_signal(signal.SIGTERM)
        for name in workers + (["head"] if "head" in self.nodes else []):
            self.stop_node(name, trees.get(name))
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _tree(self, name: str) -> list:
        try:
            return psutil.Process(self.nodes[name].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def start_cluster(head_cpus: int = 1, workers: dict[str, tuple[int, dict]] | None = None) -> RayCluster:
    """A head node (`head_cpus` CPUs) and worker nodes (name -> (cpus, custom resources)), ready."""
    # short: Ray's unix sockets live under it and a socket path is limited to 107 bytes
    cluster = RayCluster(Path(tempfile.mkdtemp(prefix="tjray", dir="/tmp")))
    try:
        cluster.start_head(head_cpus)
        cluster.wait_ready(1)
        for name, (cpus, resources) in (workers or {}).items():
            cluster.add_node(name, cpus, resources)
        cluster.wait_ready(1 + len(workers or {}))
    except BaseException:
        cluster.stop()
        raise
    return cluster
