"""A real multi-node Ray cluster on this machine, on loopback only, for job-submission tests.

    cluster = LocalRayCluster(workdir, nodes=2)
    cluster.start()                       # `ray start --head` + `ray start --address` per worker
    cluster.submit(["python", "jobs/pretrain_attr.py", ...], env={...})
    cluster.stop()

Each node gets its own loopback IP (head 127.0.0.3, workers 127.0.0.4, ...): Ray rewrites
127.0.0.1 to the machine's outward IP, but leaves other loopback addresses alone. Every port
is pinned (several raylets share the machine), job submission uses token auth, and all of
the cluster's processes carry a marker in their environment, so stop() kills exactly them and
not some other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from s3server import pick_ports

MARKER = "RAYATTR_TEST_CLUSTER"
_PORTS_PER_NODE = 9


class LocalRayCluster:
    def __init__(self, workdir: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 2):
        self.workdir = Path(workdir)
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.id = secrets.token_hex(6)
        self.token = secrets.token_hex(16)
        # a short temp dir: Ray's unix socket paths must stay under ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        ports = pick_ports(3 + nodes * _PORTS_PER_NODE)
        self.gcs_port, self.dashboard_port, self.client_port = ports[:3]
        self.node_ports = [ports[3 + i * _PORTS_PER_NODE: 3 + (i + 1) * _PORTS_PER_NODE] for i in range(nodes)]
        self.ips = [f"127.0.0.{3 + i}" for i in range(nodes)]

    @property
    def env(self) -> dict[str, str]:
        """Environment for `ray` CLI calls against this cluster."""
        return {**os.environ, MARKER: self.id, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}

    @property
    def gcs_address(self) -> str:
        return f"{self.ips[0]}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, i: int) -> list[str]:
        agent, agent_grpc, rt_env, metrics, manager, objects, wmin = self.node_ports[i][:7]
        return [f"--node-ip-address={self.ips[i]}", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
                f"--metrics-export-port={metrics}", f"--node-manager-port={manager}",
                f"--object-manager-port={objects}", f"--min-worker-port={41000 + 1000 * i}",
                f"--max-worker-port={41000 + 1000 * i + 999}", f"--num-cpus={self.cpus}",
                f"--resources={json.dumps({f'node{i}': 1})}", "--disable-usage-stats"]

    def _ray(self, args: list[str], timeout: float = 180) -> None:
        out = subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args[:2])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")

    def start(self) -> "LocalRayCluster":
        try:
            self._ray(["start", "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                       f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}",
                       *self._node_args(0)])
            for i in range(1, self.nodes):
                self._ray(["start", f"--address={self.gcs_address}", *self._node_args(i)])
            self.wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_nodes(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["ray", "status", f"--address={self.gcs_address}"], env=self.env,
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and all(f"node{i}" in out.stdout for i in range(self.nodes)):
                return
            time.sleep(1)
        raise RuntimeError(f"the {self.nodes} Ray nodes did not all join within {timeout}s")

    def submit(self, entrypoint: list[str], env: dict | None = None, working_dir: str | None = ".",
               timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir DIR` (none: the installed package) and wait for the job;
        its logs are in stdout."""
        runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", **(env or {})}}
        wd = [f"--working-dir={working_dir}"] if working_dir is not None else []
        cmd = ["ray", "job", "submit", f"--address={self.dashboard_url}", *wd,
               f"--runtime-env-json={json.dumps(runtime_env)}", "--", *entrypoint]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def _pids(self) -> list[int]:
        mine = f"{MARKER}={self.id}".encode()
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid():
                try:
                    with open(f"/proc/{d}/environ", "rb") as f:
                        if mine in f.read().split(b"\0"):
                            pids.append(int(d))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            pids = self._pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.time() + wait
            while pids and time.time() < deadline and self._pids():
                time.sleep(0.2)
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)
