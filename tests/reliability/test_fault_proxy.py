"""The fault-injecting S3 proxy (fault_proxy.py) against a real S3 server (SeaweedFS on loopback).

Besides proving that the proxy forwards correctly and injects each fault as described, these tests pin
down what the client libraries do on each fault (the findings at the top of fault_proxy.py): if a
library upgrade changes that behaviour, a test here fails and the findings need a new look.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import http.server
import os
import threading
import time
import uuid
from urllib.parse import urlsplit

import aiohttp
import boto3
import botocore.exceptions
import pytest
import s3fs
from botocore.config import Config

from support.fault_proxy import KINDS, FaultProxy

BUCKET = "fault-proxy-test"


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here uses Prefect."""
    yield


@pytest.fixture(scope="module", autouse=True)
def bucket(s3_server):
    """This module's bucket on the session's S3 server (tests/conftest.py)."""
    s3_server.create_bucket(BUCKET)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url, rate=0.0, seed=1234, slow_seconds=1.0) as p:
        yield p


@pytest.fixture
def prefix():
    return f"{BUCKET}/{uuid.uuid4().hex[:10]}"


def make_fs(server, endpoint: str, retries: dict | None = None, s3fs_retries: int | None = None) -> s3fs.S3FileSystem:
    """An s3fs filesystem pointed at ``endpoint`` (the proxy) with ``server``'s credentials."""
    config: dict = {"s3": {"addressing_style": "path"}}
    if retries is not None:
        config["retries"] = dict(retries)  # botocore mutates the dict it is given
    fs = s3fs.S3FileSystem(
        key=server.credentials.access_key, secret=server.credentials.secret_key, endpoint_url=endpoint,
        config_kwargs=config, skip_instance_cache=True, use_listings_cache=False,
    )
    if s3fs_retries is not None:
        fs.retries = s3fs_retries  # s3fs's own retry loop (class attribute, default 5)
    return fs


def make_boto(server, endpoint: str, retries: dict | None = None):
    config = Config(s3={"addressing_style": "path"}, retries=dict(retries) if retries else None,
                    connect_timeout=10, read_timeout=30)
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=config,
        aws_access_key_id=server.credentials.access_key, aws_secret_access_key=server.credentials.secret_key,
    )


# No retries anywhere: botocore makes 1 attempt, s3fs's loop 1 try. (botocore's "max_attempts" counts
# *retries*, not attempts: {"max_attempts": 1} means 2 attempts; "total_max_attempts" counts attempts.)
NO_RETRIES = {"total_max_attempts": 1, "mode": "standard"}


def chain(exc: BaseException) -> list[type]:
    out = []
    while exc is not None and len(out) < 6:
        out.append(type(exc))
        exc = exc.__cause__ or exc.__context__
    return out


# -- forwarding ----------------------------------------------------------------------------------


def test_roundtrip_without_faults(s3_server, proxy, prefix, tmp_path):
    fs = make_fs(s3_server, proxy.endpoint)
    small = b"hello through the proxy"
    fs.pipe(f"{prefix}/small.txt", small)
    assert fs.cat(f"{prefix}/small.txt") == small

    big = os.urandom(2 * 2**20 + 123)  # PUT with Expect: 100-continue, body in many TCP segments
    (tmp_path / "big.bin").write_bytes(big)
    fs.put(str(tmp_path / "big.bin"), f"{prefix}/big.bin")
    fs.get(f"{prefix}/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == big
    assert fs.cat_file(f"{prefix}/big.bin", start=100, end=200) == big[100:200]  # Range GET

    with fs.open(f"{prefix}/multipart.bin", "wb", block_size=5 * 2**20) as f:  # multipart upload
        f.write(big * 3)
    assert hashlib.sha256(fs.cat(f"{prefix}/multipart.bin")).digest() == hashlib.sha256(big * 3).digest()

    assert sorted(fs.ls(prefix)) == [f"{prefix}/{n}" for n in ("big.bin", "multipart.bin", "small.txt")]
    assert fs.info(f"{prefix}/big.bin")["size"] == len(big)

    many = {f"{prefix}/many/{i:02d}": os.urandom(100 + i) for i in range(20)}
    fs.pipe(many)  # concurrent PUTs: several client connections at once
    assert fs.cat(list(many)) == many  # concurrent GETs

    fs.rm(prefix, recursive=True)
    assert not fs.exists(f"{prefix}/small.txt")

    client = make_boto(s3_server, proxy.endpoint)  # urllib3 client; presigned URLs keep working too
    client.put_object(Bucket=BUCKET, Key="presigned", Body=small)
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "presigned"})
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)
    conn.request("GET", url[len(proxy.endpoint):])
    assert conn.getresponse().read() == small
    conn.close()

    assert proxy.injected == {}
    assert proxy.requests > 40
    assert proxy.connections < proxy.requests  # keep-alive: connections are reused


def test_chunked_bodies_and_keep_alive_are_relayed():
    """Chunked request and response bodies pass through unchanged (a stdlib upstream: S3 clients send
    Content-Length here, and SeaweedFS answers with Content-Length)."""

    class Echo(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self):
            assert self.headers["Transfer-Encoding"] == "chunked"
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Host-Seen", self.headers["Host"])
            self.end_headers()
            for part in (body[:5], body[5:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as p:
            conn = http.client.HTTPConnection(urlsplit(p.endpoint).netloc, timeout=10)
            for i in range(3):  # one connection, three requests
                conn.request("PUT", f"/x?i={i}", body=iter([b"abc", b"defgh", b"%d" % i]), encode_chunked=True,
                             headers={"Transfer-Encoding": "chunked"})
                response = conn.getresponse()
                assert response.read() == b"abcdefgh%d" % i
                assert response.getheader("X-Host-Seen") == urlsplit(p.endpoint).netloc  # Host unchanged
            conn.close()
            assert (p.requests, p.connections) == (3, 1)
    finally:
        upstream.shutdown()
        upstream.server_close()


# -- each fault kind, seen by a client that does not retry ---------------------------------------


@pytest.mark.parametrize("kind", ["503", "500"])
def test_error_faults_are_s3_errors(s3_server, proxy, kind):
    client = make_boto(s3_server, proxy.endpoint, NO_RETRIES)
    client.put_object(Bucket=BUCKET, Key="err", Body=b"x")
    proxy.inject_next(kind, 2)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.get_object(Bucket=BUCKET, Key="err")
    error = info.value.response
    expected = {"503": ("SlowDown", "Please reduce your request rate."),
                "500": ("InternalError", "We encountered an internal error. Please try again.")}[kind]
    assert (error["Error"]["Code"], error["Error"]["Message"]) == expected
    assert error["ResponseMetadata"]["HTTPStatusCode"] == int(kind)
    with pytest.raises(botocore.exceptions.ClientError) as info:  # HEAD: no body, so no S3 code
        client.head_object(Bucket=BUCKET, Key="err")
    assert info.value.response["Error"]["Code"] == kind
    assert proxy.injected == {kind: 2}
    assert client.get_object(Bucket=BUCKET, Key="err")["Body"].read() == b"x"  # connection still usable


def test_reset_fault_is_a_tcp_reset(s3_server, proxy):
    proxy.inject_next("reset")
    conn = http.client.HTTPConnection(urlsplit(proxy.endpoint).netloc, timeout=10)
    conn.request("GET", f"/{BUCKET}/anything")
    with pytest.raises(ConnectionResetError):  # RST, not a clean close (RemoteDisconnected)
        conn.getresponse()
    conn.close()

    client = make_boto(s3_server, proxy.endpoint, NO_RETRIES)
    proxy.inject_next("reset", methods=["PUT"])
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        client.put_object(Bucket=BUCKET, Key="reset", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError, match="NoSuchKey"):
        client.get_object(Bucket=BUCKET, Key="reset")  # a reset request never reaches the server
    assert proxy.injected == {"reset": 2}


def test_truncate_fault_cuts_the_body(s3_server, proxy):
    client = make_boto(s3_server, proxy.endpoint, NO_RETRIES)
    data = os.urandom(10_000)
    client.put_object(Bucket=BUCKET, Key="trunc", Body=data)

    proxy.inject_next("truncate")
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "trunc"})
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)
    conn.request("GET", url[len(proxy.endpoint):])
    response = conn.getresponse()
    assert (response.status, response.getheader("Content-Length")) == (200, str(len(data)))
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()
    assert info.value.partial == data[: len(data) // 2]
    conn.close()

    proxy.inject_next("truncate")
    body = client.get_object(Bucket=BUCKET, Key="trunc")["Body"]  # the head arrives fine ...
    with pytest.raises(botocore.exceptions.ResponseStreamingError):  # ... the body does not
        body.read()

    # A response without a body cannot be truncated: the request is executed, the response lost (RST).
    proxy.inject_next("truncate", methods=["PUT"])
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        client.put_object(Bucket=BUCKET, Key="trunc-put", Body=b"y")
    assert client.get_object(Bucket=BUCKET, Key="trunc-put")["Body"].read() == b"y"
    assert proxy.injected == {"truncate": 2, "reset": 1}
    assert proxy.truncate_fallbacks == 1


def test_slow_fault_delays_a_correct_response(s3_server, proxy):
    client = make_boto(s3_server, proxy.endpoint, NO_RETRIES)
    client.put_object(Bucket=BUCKET, Key="slow", Body=b"patience")
    proxy.inject_next("slow")
    start = time.monotonic()
    assert client.get_object(Bucket=BUCKET, Key="slow")["Body"].read() == b"patience"
    assert time.monotonic() - start >= proxy.slow_seconds
    assert proxy.injected == {"slow": 1}


def test_rate_kinds_methods_and_seed(s3_server):
    """``rate``/``kinds``/``methods`` select what is faulted; a seed makes a sequential run reproducible."""

    def run() -> list[str]:
        with FaultProxy(s3_server.endpoint_url, rate=0.5, kinds=("503", "500"), methods=["HEAD"], seed=7) as p:
            client = make_boto(s3_server, p.endpoint, NO_RETRIES)
            client.put_object(Bucket=BUCKET, Key="seeded", Body=b"s")  # PUT: never faulted
            outcomes = []
            for _ in range(20):
                try:
                    client.head_object(Bucket=BUCKET, Key="seeded")
                    outcomes.append("ok")
                except botocore.exceptions.ClientError as exc:
                    outcomes.append(exc.response["Error"]["Code"])
            assert p.requests == 21 and sum(p.injected.values()) == 20 - outcomes.count("ok")
            p.rate = 0  # pause
            client.head_object(Bucket=BUCKET, Key="seeded")
            return outcomes

    first = run()
    assert first == run()
    assert {"ok", "503", "500"} <= set(first)


# -- what s3fs (aiobotocore + aiohttp) raises to its caller ---------------------------------------


def _s3fs_outcome(fs, operation):
    try:
        operation()
    except Exception as exc:  # noqa: BLE001 - the type is what is being recorded
        return exc
    return None


def test_s3fs_exceptions_when_nothing_retries(s3_server, proxy, prefix):
    """Every fault on every try, with botocore's and s3fs's retries off: the exception s3fs raises is the
    one it raises after exhausting its default retries too (fault_proxy.py's findings table)."""
    fs = make_fs(s3_server, proxy.endpoint, NO_RETRIES, s3fs_retries=1)
    key = f"{prefix}/obj"
    data = os.urandom(3000)
    fs.pipe(key, data)
    obj_get = lambda m, t: m == "GET" and "list-type" not in t  # noqa: E731
    list_get = lambda m, t: m == "GET" and "list-type" in t  # noqa: E731

    def outcome(kind, operation, methods=None, match=None):
        proxy.reset_counters()
        proxy.kinds, proxy.methods, proxy.match, proxy.rate = (kind,), methods, match, 1.0
        try:
            return _s3fs_outcome(fs, operation), proxy.injected
        finally:
            proxy.rate, proxy.methods, proxy.match = 0.0, None, None

    # 503 SlowDown / 500 InternalError: translated to plain OSError with an errno; ClientError is the cause.
    exc, _ = outcome("503", lambda: fs.cat_file(key), match=obj_get)
    assert type(exc) is OSError and exc.errno == errno.EBUSY
    assert isinstance(exc.__cause__, botocore.exceptions.ClientError)
    exc, _ = outcome("500", lambda: fs.cat_file(key), match=obj_get)
    assert type(exc) is OSError and exc.errno == getattr(errno, "EREMOTEIO", errno.EIO)

    # reset: botocore.exceptions.EndpointConnectionError (not an OSError!) wrapping aiohttp.ClientOSError.
    # aiohttp itself resends idempotent methods (GET/HEAD/PUT/DELETE) once on a reset: 2 requests for
    # one botocore attempt; POST (DeleteObjects, multipart create/complete) is sent once.
    exc, injected = outcome("reset", lambda: fs.pipe(key, data), methods=["PUT"])
    assert type(exc) is botocore.exceptions.EndpointConnectionError and not isinstance(exc, OSError)
    assert aiohttp.ClientOSError in chain(exc) and injected == {"reset": 2}
    exc, injected = outcome("reset", lambda: fs.rm(key), methods=["POST"])
    assert type(exc) is botocore.exceptions.EndpointConnectionError and injected == {"reset": 1}
    proxy.reset_counters()
    proxy.inject_next("reset", methods=["GET"])  # a single reset: invisible to botocore and s3fs
    assert fs.cat_file(key) == data and proxy.injected == {"reset": 1}

    # truncated object body (GET): the raw aiohttp.ClientPayloadError reaches the caller, not a botocore
    # error (botocore only hands the stream over); s3fs's own loop is what retries it.
    exc, _ = outcome("truncate", lambda: fs.cat_file(key), match=obj_get)
    assert type(exc) is aiohttp.ClientPayloadError and not isinstance(exc, (OSError, botocore.exceptions.BotoCoreError))
    exc, _ = outcome("truncate", lambda: fs.open(key, "rb").read(), match=obj_get)
    assert type(exc) is aiohttp.ClientPayloadError
    # truncated XML body (ListObjectsV2): read inside aiobotocore -> botocore ConnectionClosedError.
    exc, _ = outcome("truncate", lambda: fs.ls(prefix, refresh=True), match=list_get)
    assert type(exc) is botocore.exceptions.ConnectionClosedError
    assert aiohttp.ClientPayloadError in chain(exc)


def test_s3fs_default_retries_on_truncated_bodies(s3_server, proxy, prefix):
    """With s3fs's defaults, a truncated object body is retried by s3fs (5 tries in all), not botocore."""
    fs = make_fs(s3_server, proxy.endpoint)
    key = f"{prefix}/obj"
    data = os.urandom(3000)
    fs.pipe(key, data)
    proxy.inject_next("truncate", 4, methods=["GET"])
    assert fs.cat_file(key) == data
    assert [k for m, _, k in proxy.log if m == "GET"] == ["truncate"] * 4 + [""]
    proxy.reset_counters()
    proxy.inject_next("truncate", 5, methods=["GET"])
    with pytest.raises(aiohttp.ClientPayloadError):
        fs.cat_file(key)
    assert [k for m, _, k in proxy.log if m == "GET"] == ["truncate"] * 5


def test_lost_response_to_a_conditional_put_comes_back_as_412(s3_server, proxy, prefix):
    """A create-if-absent PUT (If-None-Match: *) that the server executed but whose response was lost is
    resent by a lower layer, and the resend is refused (412) although this very call created the object.
    With botocore's and s3fs's retries off, aiohttp's hidden resend of idempotent methods still does it."""
    fs = make_fs(s3_server, proxy.endpoint, NO_RETRIES, s3fs_retries=1)
    key = f"{prefix}/commit"
    proxy.inject_next("truncate", methods=["PUT"])  # PUT has no response body: executed, then RST
    with pytest.raises(OSError) as info:
        with fs.open(key, "xb") as f:
            f.write(b"mine")
    # s3fs maps 412 to FileExistsError only when the error names the If-None-Match condition (AWS does,
    # SeaweedFS does not): here it is OSError(EINVAL).
    assert info.value.errno == errno.EINVAL or isinstance(info.value, FileExistsError)
    assert info.value.__cause__.response["Error"]["Code"] == "PreconditionFailed"
    assert [(m, k) for m, _, k in proxy.log if m == "PUT"] == [("PUT", "reset"), ("PUT", "")]
    assert fs.cat_file(key) == b"mine"

    client = make_boto(s3_server, proxy.endpoint)  # boto3 defaults: botocore resends it
    proxy.reset_counters()
    proxy.inject_next("truncate", methods=["PUT"])
    with pytest.raises(botocore.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=BUCKET, Key=f"{key.split('/', 1)[1]}-boto", Body=b"mine", IfNoneMatch="*")
    assert [(m, k) for m, _, k in proxy.log if m == "PUT"] == [("PUT", "reset"), ("PUT", "")]


# -- clients with retries survive random faults --------------------------------------------------


def test_clients_with_retries_survive_random_faults(s3_server):
    retries = {"max_attempts": 10, "mode": "standard"}  # 10 retries, 11 attempts
    objects = {f"random/{i:02d}": os.urandom(200 + 37 * i) for i in range(30)}
    with FaultProxy(s3_server.endpoint_url, rate=0.2, kinds=KINDS, seed=4, slow_seconds=0.2) as p:
        client = make_boto(s3_server, p.endpoint, retries)
        fs = make_fs(s3_server, p.endpoint, retries)
        for key, data in objects.items():  # writes under faults (boto3 / urllib3)
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        listed = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="random/")["Contents"]}
        assert listed == set(objects)
        s3fs_start = len(p.log)
        for key, data in objects.items():  # reads under faults (s3fs)
            assert fs.cat_file(f"{BUCKET}/{key}") == data
            assert client.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == len(data)

        # boto3's get_object: botocore does not retry a body cut after the headers; the caller must.
        start = len(p.log)
        streaming_errors = 0
        for key, data in objects.items():
            for _ in range(10):
                try:
                    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
                    break
                except botocore.exceptions.ResponseStreamingError:
                    streaming_errors += 1
            else:
                pytest.fail(f"{key}: ten truncated reads in a row")
        log = p.log
        s3fs_truncated = sum(1 for m, _, k in log[s3fs_start:start] if (m, k) == ("GET", "truncate"))
        truncated_gets = sum(1 for m, _, k in log[start:] if (m, k) == ("GET", "truncate"))
        injected = p.injected
        p.rate = 0
        fs.rm(f"{BUCKET}/random", recursive=True)
    assert sum(injected.values()) >= 20 and len(injected) >= 4, injected
    assert set(injected) <= set(KINDS)
    # The seed is chosen so that truncated bodies reach both readers (sequential requests: reproducible).
    assert s3fs_truncated >= 1  # s3fs retried those itself
    assert streaming_errors == truncated_gets >= 1
