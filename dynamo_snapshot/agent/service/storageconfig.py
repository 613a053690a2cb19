"""The ``storage`` section of the agent's configuration file: where checkpoints are kept.

    storage:
      type: pvc                 # pvc (default): the PVC or host directory of --storage-base-path, as before
                                # s3: object storage; --storage-base-path is then a node-local directory
      s3:
        bucket: checkpoints     # required with type s3
        prefix: fleet/a         # key prefix: s3://<bucket>/<prefix>/<checkpointID>/versions/<v>/
        endpoint: ""            # "" : AWS's regional endpoint; e.g. http://minio.storage:9000
        region: us-east-1
        forcePathStyle: false   # true for MinIO and most self-hosted servers
        insecureSkipTLSVerify: false   # accept any certificate (a test endpoint only)
        caBundle: ""            # a PEM file added to the trusted roots
        credentialsDirectory: ""       # a mounted Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY files
        concurrency: 8          # files (and ranged reads) in flight per checkpoint
        partMiB: 32             # multipart part size

Stages: ``storage_settings`` parses and validates the section (pure: the environment is a parameter);
``credentials`` reads the keys - from ``credentialsDirectory`` when set, else the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, which the snapshot chart sets from
the Secret ``storage.s3.credentialsSecret``); neither: the pod's cloud identity. ``object_storage`` then
makes the pipelines' ``ObjectStorage``. Every error names the field and what to give instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_snapshot.agent.artifact.objectstore import DEFAULT_CONCURRENCY
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.artifact.s3 import S3Client, S3Settings
from dynamo_snapshot.agent.service.configfields import ConfigError, bounded, section, typed
from dynamo_snapshot.api import names

S3_KEYS = {"bucket", "prefix", "endpoint", "region", "forcePathStyle", "insecureSkipTLSVerify", "caBundle",
           "credentialsDirectory", "concurrency", "partMiB"}
# S3's bucket naming rules, the part a typo breaks: 3-63 lowercase letters, digits, dots, hyphens
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()/-]*$")


@dataclass(frozen=True)
class S3Storage:
    bucket: str
    prefix: str = ""
    endpoint: str = ""
    region: str = "us-east-1"
    force_path_style: bool = False
    insecure_skip_tls_verify: bool = False
    ca_bundle: str = ""
    credentials_directory: str = ""
    concurrency: int = DEFAULT_CONCURRENCY
    part_mib: int = 32

    def url(self, checkpoint_id: str = "") -> str:
        """``s3://bucket/prefix/<checkpointID>`` (the checkpoint's status ``location``)."""
        return "/".join(p for p in (f"s3://{self.bucket}", self.prefix, checkpoint_id) if p)


@dataclass(frozen=True)
class StorageSettings:
    type: str = names.STORAGE_TYPE_PVC
    s3: S3Storage | None = None


def _string(sec: dict[str, Any], key: str, where: str, default: str = "") -> str:
    return typed(sec, key, str, where) if key in sec and sec[key] is not None else default


def _absolute(sec: dict[str, Any], key: str, where: str) -> str:
    value = _string(sec, key, where)
    if value and not value.startswith("/"):
        raise ConfigError(f"{where}.{key}: expected an absolute path, got {value!r}")
    return value


def _endpoint(sec: dict[str, Any], where: str) -> str:
    endpoint = _string(sec, "endpoint", where).rstrip("/")
    if endpoint and not re.match(r"^https?://[^/\s]+$", endpoint):
        raise ConfigError(f"{where}.endpoint: expected http(s)://host[:port] without a path, got {endpoint!r}")
    return endpoint


def s3_storage(data: Any, where: str = "storage.s3") -> S3Storage:
    sec = section(data, where, S3_KEYS)
    bucket = _string(sec, "bucket", where)
    if not BUCKET.match(bucket):
        raise ConfigError(f"{where}.bucket: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, "
                          "dots, hyphens); required with storage.type s3")
    prefix = _string(sec, "prefix", where).strip("/")
    segments = prefix.split("/") if prefix else []
    if not PREFIX.match(prefix) or any(p in ("", ".", "..") for p in segments):
        raise ConfigError(f"{where}.prefix: {prefix!r} is not a key prefix (path segments of letters, digits "
                          "and !_.*'()- ; no empty, . or .. segment)")
    fields: dict[str, Any] = {"bucket": bucket, "prefix": prefix, "endpoint": _endpoint(sec, where),
                              "ca_bundle": _absolute(sec, "caBundle", where),
                              "credentials_directory": _absolute(sec, "credentialsDirectory", where)}
    if region := _string(sec, "region", where):
        fields["region"] = region
    for key, name in (("forcePathStyle", "force_path_style"), ("insecureSkipTLSVerify", "insecure_skip_tls_verify")):
        if key in sec:
            fields[name] = typed(sec, key, bool, where)
    if fields.get("insecure_skip_tls_verify") and fields["ca_bundle"]:
        raise ConfigError(f"{where}: give caBundle or insecureSkipTLSVerify, not both")
    if "concurrency" in sec:
        fields["concurrency"] = bounded(sec, "concurrency", 1, 256, where)
    if "partMiB" in sec:
        fields["part_mib"] = bounded(sec, "partMiB", 5, 5120, where, " (S3's part size limits)")
    return S3Storage(**fields)


def storage_settings(data: Any, where: str = "storage") -> StorageSettings:
    sec = section(data, where, {"type", "s3"})
    kind = sec.get("type") or names.STORAGE_TYPE_PVC
    if kind not in names.STORAGE_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(names.STORAGE_TYPES)}")
    if kind == names.STORAGE_TYPE_PVC:
        return StorageSettings()  # storage.s3 may stay in a values file that switched back to pvc
    return StorageSettings(kind, s3_storage(sec.get("s3"), f"{where}.s3"))


@dataclass(frozen=True)
class Credentials:
    access_key_id: str | None = None  # None: the pod's cloud identity (the AWS default chain)
    secret_access_key: str | None = None
    session_token: str | None = None


def _read_secret_file(directory: Path, name: str) -> str | None:
    try:
        return (directory / name).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"storage.s3.credentialsDirectory: {directory / name} cannot be read ({err})") from None


def credentials(s3: S3Storage, env: Mapping[str, str]) -> Credentials:
    """The S3 keys: files in ``credentialsDirectory`` when it is set, else the environment's."""
    names_ = (names.ENV_S3_ACCESS_KEY_ID, names.ENV_S3_SECRET_ACCESS_KEY, names.ENV_S3_SESSION_TOKEN)
    if s3.credentials_directory:
        directory = Path(s3.credentials_directory)
        if not directory.is_dir():
            raise ConfigError(f"storage.s3.credentialsDirectory: {directory} is not a directory (mount the "
                              "credentials Secret there, or leave it empty to use the environment)")
        key, secret, token = (_read_secret_file(directory, n) for n in names_)
        source = f"files in {directory}"
    else:
        key, secret, token = (env.get(n) or None for n in names_)
        source = "environment variables"
    if (key is None) != (secret is None):
        have, lack = (names_[0], names_[1]) if key else (names_[1], names_[0])
        raise ConfigError(f"storage.s3 credentials: {have} is set but {lack} is not ({source}); give both, "
                          "or neither to use the pod's cloud identity")
    return Credentials(key, secret, token)


def object_storage(s3: S3Storage, creds: Credentials) -> ObjectStorage:
    """The pipelines' storage parameter for this configuration (reads ``caBundle``)."""
    settings = S3Settings(
        bucket=s3.bucket, endpoint=s3.endpoint or None, region=s3.region, path_style=s3.force_path_style,
        access_key_id=creds.access_key_id, secret_access_key=creds.secret_access_key,
        session_token=creds.session_token, ca_file=s3.ca_bundle or None,
        insecure_skip_tls_verify=s3.insecure_skip_tls_verify, part_bytes=s3.part_mib << 20)
    try:
        client = S3Client(settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ObjectStorage(client, prefix=s3.prefix, concurrency=s3.concurrency)

