"""A real S3 server for the tests and the local stack: MinIO (built by hack/build-minio.sh) on loopback.

    locate    the binary: ``DYNAMO_SNAPSHOT_MINIO`` or ``~/.cache/dynamo-snapshot/bin/minio-<version>/minio``;
              ``missing()`` says in one line why it is not there (the tests skip with it)
    start     ``minio server <root>/data`` on 127.0.0.1 at a free port, a generated root user and password,
              the web console and the update check off, its log in ``<root>/minio.log``
    ready     polls ``/minio/health/cluster`` (write quorum: it serves S3, not only lives) until it answers 200
              (or the process exits, or a deadline)
    bucket    creates a bucket with one SigV4-signed ``PUT /<bucket>`` (``request`` signs any S3 call the
              harness needs; the agent itself uses its S3 client library); ``list_objects`` lists a prefix
    agent     ``agent_storage``: the agent configuration's ``storage`` section for this server, its keys as
              files in a directory (as the chart's Secret would be mounted)
    stop      SIGTERM, then SIGKILL after a grace period; the data directory stays for inspection

Nothing here reaches past 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.client
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_snapshot.devcluster.binaries import cache_dir

MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"  # hack/build-minio.sh's pin
BINARY_ENV = "DYNAMO_SNAPSHOT_MINIO"
REGION = "us-east-1"
READY_TIMEOUT_S = 60.0
GRACE_S = 10.0


class MinioError(RuntimeError):
    pass


def binary() -> Path:
    override = os.environ.get(BINARY_ENV)
    return Path(override) if override else cache_dir() / "bin" / f"minio-{MINIO_VERSION}" / "minio"


def missing() -> str | None:
    """Why MinIO cannot run here, in one line, or None."""
    path = binary()
    if not os.access(path, os.X_OK):
        return f"no MinIO binary at {path}: run hack/build-minio.sh (needs Go and the Go module proxy)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


@dataclass
class Minio:
    root: Path
    user: str = field(default_factory=lambda: "snap" + secrets.token_hex(6))
    password: str = field(default_factory=lambda: secrets.token_hex(20))
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "minio.log"

    def start(self) -> Minio:
        reason = missing()
        if reason:
            raise MinioError(reason)
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.user,
            "MINIO_ROOT_PASSWORD": self.password,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_REGION": REGION,
        }
        command = [str(binary()), "server", str(self.root / "data"), "--quiet",
                   "--address", f"127.0.0.1:{self.port}", "--console-address", f"127.0.0.1:{_free_port()}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready()
        return self

    def _get(self, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise MinioError(f"minio exited with {self.process.returncode} before it was ready: "
                                 f"{self._log_tail()}")
            with contextlib.suppress(OSError):
                if self._get("/minio/health/cluster") == 200:
                    return
            if time.monotonic() > deadline:
                raise MinioError(f"minio on port {self.port} not live after {timeout_s:.0f}s: {self._log_tail()}")
            time.sleep(0.1)  # polling a server that is starting; correctness does not depend on it

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-8:])
        except FileNotFoundError:
            return "(no log)"

    def request(self, method: str, path: str, body: bytes = b"", query: str = "") -> tuple[int, bytes]:
        """One S3 call signed with AWS Signature Version 4 as the root user; returns (status, body)."""
        status, data, _ = self._call(method, path, body, query)
        return status, data

    def head(self, path: str) -> tuple[int, dict[str, str]]:
        """A signed HEAD of an object: (status, headers with lower-case names)."""
        status, _, headers = self._call("HEAD", path, b"", "")
        return status, headers

    def _call(self, method: str, path: str, body: bytes, query: str) -> tuple[int, bytes, dict[str, str]]:
        now = datetime.datetime.now(datetime.UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        host = f"127.0.0.1:{self.port}"
        payload = hashlib.sha256(body).hexdigest()
        quoted = urllib.parse.quote(path, safe="/-_.~")
        headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": stamp}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, quoted, query, *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                               signed, payload])
        scope = f"{day}/{REGION}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = _sign(_sign(_sign(_sign(f"AWS4{self.password}".encode(), day), REGION), "s3"), "aws4_request")
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.user}/{scope}, SignedHeaders={signed}, "
                                    f"Signature={signature}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, quoted + (f"?{query}" if query else ""), body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def create_bucket(self, name: str) -> str:
        status, body = self.request("PUT", f"/{name}")
        if status != 200:
            raise MinioError(f"creating bucket {name!r} failed with HTTP {status}: {body[:300]!r}")
        return name

    def list_objects(self, bucket: str, prefix: str = "") -> list[tuple[str, str, int]]:
        """(key, LastModified, size) of every object under ``prefix`` (one ListObjectsV2 page: up to 1000)."""
        query = "list-type=2&prefix=" + urllib.parse.quote(prefix, safe="-_.~")
        status, body = self.request("GET", f"/{bucket}", query=query)
        if status != 200:
            raise MinioError(f"listing s3://{bucket}/{prefix} failed with HTTP {status}: {body[:300]!r}")
        ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
        return [(item.findtext("s3:Key", "", ns), item.findtext("s3:LastModified", "", ns),
                 int(item.findtext("s3:Size", "0", ns))) for item in ET.fromstring(body).findall("s3:Contents", ns)]

    def agent_storage(self, bucket: str, prefix: str, credentials: Path) -> dict[str, object]:
        """The agent configuration's ``storage`` section for this server; the keys are written as files
        into ``credentials`` (``storage.s3.credentialsDirectory``, readable by the owner only)."""
        credentials.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, value in (("AWS_ACCESS_KEY_ID", self.user), ("AWS_SECRET_ACCESS_KEY", self.password)):
            path = credentials / name
            path.write_text(value)
            path.chmod(0o600)
        return {"type": "s3", "s3": {"bucket": bucket, "prefix": prefix, "endpoint": self.endpoint, "region": REGION,
                                     "forcePathStyle": True, "credentialsDirectory": str(credentials)}}

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def running(root: Path) -> Iterator[Minio]:
    server = Minio(root)
    try:
        yield server.start()
    finally:
        server.stop()
