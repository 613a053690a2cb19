"""The S3 client of the object-storage backend (``objectstore.ObjectClient``), on obstore.

    settings  ``S3Settings``: bucket, endpoint, region, path-style addressing, credentials (static keys, or
              none: the pod's cloud identity through the AWS default chain), a TLS CA bundle, part size and
              per-file part concurrency, retry bounds
    store     one ``obstore.store.S3Store`` per client (its own connection pool; asyncio-native calls that
              release the GIL while the bytes move)
    calls     get (whole small object, None when missing), get_range, exists (HEAD), put_bytes (optionally
              create-only: a conditional PUT that refuses an existing key), put_file (multipart in
              ``part_bytes`` parts, ``part_concurrency`` of them in flight), delete, list_keys (a prefix of
              path segments), delete_many (DeleteObjects, 1000 keys a request)
    errors    every obstore error becomes ``ObjectStoreError`` naming the ``s3://bucket/key`` and, for the
              cases users hit (credentials, missing bucket, unreachable endpoint), the setting to fix

The choice of obstore over aiobotocore, with the figures, is in docs/decisions.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore import exceptions as obx
from obstore.store import S3Store

from dynamo_snapshot.agent.artifact.objectstore import ObjectStoreError

DEFAULT_PART_BYTES = 32 << 20
# obstore raises its own classes for some failures and Python's (FileNotFoundError, FileExistsError, ...) for others
FAILED = (obx.BaseError, OSError)
MISSING = (obx.NotFoundError, FileNotFoundError)
EXISTS = (obx.AlreadyExistsError, obx.PreconditionError, FileExistsError)
DEFAULT_PART_CONCURRENCY = 8


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    endpoint: str | None = None  # None: AWS's regional endpoint
    region: str = "us-east-1"
    path_style: bool = False  # True for MinIO and most self-hosted servers
    access_key_id: str | None = None  # None: the AWS default chain (env, web identity, instance metadata)
    secret_access_key: str | None = None
    session_token: str | None = None
    ca_file: str | None = None  # a PEM bundle added to the trusted roots
    insecure_skip_tls_verify: bool = False  # accept any server certificate (a test endpoint only)
    part_bytes: int = DEFAULT_PART_BYTES
    part_concurrency: int = DEFAULT_PART_CONCURRENCY
    max_retries: int = 5
    retry_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ValueError(f"storage.s3.bucket {self.bucket!r} is not a bucket name")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("storage.s3 credentials: give both the access key ID and the secret access key, "
                             "or neither (to use the pod's cloud identity)")
        if self.part_bytes < 5 << 20:
            raise ValueError(f"storage.s3.partBytes {self.part_bytes} is below S3's 5 MiB minimum part size")


def _store(settings: S3Settings) -> S3Store:
    config: dict[str, Any] = {"region": settings.region,
                              "virtual_hosted_style_request": not settings.path_style}
    if settings.endpoint:
        config["endpoint"] = settings.endpoint
    if settings.access_key_id is not None:
        config["access_key_id"] = settings.access_key_id
        config["secret_access_key"] = settings.secret_access_key
        if settings.session_token:
            config["session_token"] = settings.session_token
    client: dict[str, Any] = {"connect_timeout": timedelta(seconds=settings.connect_timeout_s),
                              "allow_http": bool(settings.endpoint and settings.endpoint.startswith("http://"))}
    if settings.insecure_skip_tls_verify:
        client["allow_invalid_certificates"] = True
    if settings.ca_file:
        try:
            client["root_certificate"] = Path(settings.ca_file).read_bytes()
        except OSError as err:
            raise ValueError(f"storage.s3.caBundle {settings.ca_file}: {err.strerror}") from err
    retry = {"max_retries": settings.max_retries, "retry_timeout": timedelta(seconds=settings.retry_timeout_s),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5),
                         "base": 2}}
    return S3Store(settings.bucket, client_options=client, retry_config=retry, **config)


# 499 and 503: what a server shutting down (MinIO on SIGTERM) answers the requests still in flight
UNREACHABLE = ("error sending request", "Connection refused", "dns error", "timed out", "connection closed",
               "status code: 499", "status code: 503")
REFUSED = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403 Forbidden", "status: 403")


def _hint(err: Exception) -> str:
    """What to fix, for the failures users meet (pure)."""
    text = str(err)
    if "NoSuchBucket" in text:
        return "the bucket does not exist: create it, or fix storage.s3.bucket"
    if isinstance(err, MISSING):
        return "the object is not there (deleted meanwhile, with its checkpoint?)"
    if any(word in text for word in UNREACHABLE):
        return "the endpoint could not be reached: check storage.s3.endpoint and the network"
    if (isinstance(err, obx.UnauthenticatedError | obx.PermissionDeniedError | PermissionError)
            or any(code in text for code in REFUSED)):
        return ("the credentials were refused: check storage.s3 accessKeyID/secretAccessKey (the Secret "
                "storage.s3.credentialsSecret) and the bucket policy")
    return "see the error above"


class S3Client:
    """``objectstore.ObjectClient`` over one bucket."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self.store = _store(settings)

    def url(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{key}"

    def _error(self, action: str, key: str, err: Exception) -> ObjectStoreError:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ObjectStoreError(f"{action} {self.url(key)} failed: {_hint(err)} ({type(err).__name__}: "
                                f"{first[:400]})")

    def _missing(self, err: Exception) -> bool:
        return isinstance(err, MISSING) and "NoSuchBucket" not in str(err)

    async def get(self, key: str, max_bytes: int) -> bytes | None:
        try:
            meta = await obstore.head_async(self.store, key)
            if meta["size"] > max_bytes:
                raise ObjectStoreError(f"{self.url(key)} is {meta['size']} bytes, more than the {max_bytes} "
                                       "such an object may have: refused")
            result = await obstore.get_async(self.store, key)
            return bytes(await result.bytes_async())
        except FAILED as err:
            if self._missing(err):
                await self._check_bucket(key)
                return None
            raise self._error("reading", key, err) from err

    async def _check_bucket(self, key: str) -> None:
        """A HEAD of a missing object says 404 whether or not the bucket exists: a listing tells them apart."""
        try:
            await obstore.list_with_delimiter_async(self.store, key.rpartition("/")[0] or None)
        except FAILED as err:
            raise self._error("listing", key, err) from err

    async def get_range(self, key: str, start: int, length: int) -> Any:
        """Bytes [start, start+length) of ``key`` (a buffer; shorter when the object is)."""
        if length == 0:
            return b""
        try:
            return await obstore.get_range_async(self.store, key, start=start, length=length)
        except FAILED as err:
            if "416 Range Not Satisfiable" in str(err):
                return b""  # the object ends before ``start``: the caller names it as shorter than listed
            raise self._error(f"reading bytes {start}-{start + length} of", key, err) from err

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self.store, key)
            return True
        except FAILED as err:
            if self._missing(err):
                return False
            raise self._error("looking up", key, err) from err

    async def put_bytes(self, key: str, data: bytes, create_only: bool = False) -> None:
        try:
            await obstore.put_async(self.store, key, data, mode="create" if create_only else "overwrite",
                                    use_multipart=False)
        except EXISTS as err:
            raise ObjectStoreError(f"{self.url(key)} already exists: it is never replaced") from err
        except FAILED as err:
            raise self._error("writing", key, err) from err

    async def put_file(self, key: str, path: Path) -> None:
        try:
            await obstore.put_async(self.store, key, Path(path), chunk_size=self.settings.part_bytes,
                                    max_concurrency=self.settings.part_concurrency)
        except FAILED as err:
            raise self._error(f"uploading {path} to", key, err) from err

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self.store, key)
        except FAILED as err:
            if not self._missing(err):
                raise self._error("deleting", key, err) from err

    async def list_keys(self, prefix: str) -> list[str]:
        """Every key below ``prefix`` + "/" (obstore matches whole path segments: ``a/ck1`` not ``a/ck10``)."""
        keys: list[str] = []
        try:
            async for batch in obstore.list(self.store, prefix=prefix, chunk_size=1000):
                keys += [str(meta["path"]) for meta in batch]
        except FAILED as err:
            raise self._error("listing", prefix + "/", err) from err
        return keys

    async def delete_many(self, keys: list[str]) -> None:
        """DeleteObjects, up to 1000 keys a request."""
        try:
            await obstore.delete_async(self.store, keys)
        except FAILED as err:
            if not self._missing(err):
                raise self._error(f"deleting {len(keys)} objects, among them", keys[0], err) from err
