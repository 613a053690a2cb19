"""Operator configuration (a file or ConfigMap, not a CRD): SPEC section 2.

Parsing, in order: read the file (missing, a directory, not UTF-8: named errors); YAML (too deep: named);
unwrap upstream's platform-chart shape (`dynamo-operator: {checkpoint: ...}`, same meaning); refuse every
key that is not a setting (naming it, with the closest one); the guide's shared-agent values (`pvc.create:
true` without `storage.accessMode`) mean podMount, as upstream; convert to the structs; cross-field rules.
"""

from __future__ import annotations

import difflib
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml
from msgspec import Meta

from dynamo_snapshot.api.decode import InvalidObject, convert
from dynamo_snapshot.api.meta import Base


class StorageAccessMode(StrEnum):
    """How checkpoint storage reaches the agent (mirrors the snapshot chart's `storage.accessMode`)."""

    AGENT_MOUNT = "agentMount"  # the agent DaemonSet mounts the PVC (default)
    POD_MOUNT = "podMount"  # only the workload pod mounts its namespace's PVC


AbsolutePath = Annotated[str, Meta(pattern=r"^/")]


class PVCStorage(Base):
    pvc_name: str = "snapshot-pvc"
    base_path: AbsolutePath = "/checkpoints"
    create: bool = False
    size: str = ""  # required when create is true
    storage_class_name: str = ""
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"] = "ReadWriteMany"


S3Prefix = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!_.*'()/-]*$")]


class S3Storage(Base):
    """Object storage: where the agents (the snapshot chart's storage.s3, the same bucket and prefix) keep
    checkpoints. The operator needs no credentials: it only names the location in status."""

    bucket: str = ""  # required with type s3
    prefix: S3Prefix = ""

    def url(self, checkpoint_id: str = "") -> str:
        """``s3://bucket/prefix/<checkpointID>``."""
        return "/".join(p for p in (f"s3://{self.bucket}", self.prefix.strip("/"), checkpoint_id) if p)


class StorageConfig(Base):
    type: Literal["pvc", "s3"] = "pvc"
    # Left out: podMount when pvc.create is true (the operator creates the PVCs only pods mount), else
    # agentMount - as upstream, whose operator has no such setting (see docs/compatibility.md).
    access_mode: StorageAccessMode = StorageAccessMode.AGENT_MOUNT
    pvc: PVCStorage = msgspec.field(default_factory=PVCStorage)
    s3: S3Storage = msgspec.field(default_factory=S3Storage)  # type s3 only; accessMode and pvc are then unused


class StagingConfig(Base):
    """Pre-staging (docs/agent.md#pre-staging): how many nodes' agents fetch a Ready checkpoint ahead of the
    pods that restore from it; 0 turns it off (and the operator then watches no Nodes)."""

    max_nodes: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3


class CheckpointConfig(Base):
    enabled: bool = False
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    staging: StagingConfig = msgspec.field(default_factory=StagingConfig)
    cleanup_image: str = "busybox:1.36"


class OperatorConfig(Base):
    checkpoint: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)


def validate_config(config: OperatorConfig) -> OperatorConfig:
    """Cross-field rules the types cannot say."""
    storage = config.checkpoint.storage
    if storage.type == "s3":
        bucket = storage.s3.bucket
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
            raise InvalidObject("checkpoint.storage.s3.bucket", f"{bucket!r} is not a bucket name (3-63 lowercase "
                                "letters, digits, dots, hyphens); required with checkpoint.storage.type s3 - "
                                "the snapshot chart's storage.s3.bucket")
        prefix = storage.s3.prefix.strip("/")
        if any(p in ("", ".", "..") for p in (prefix.split("/") if prefix else [])):
            raise InvalidObject("checkpoint.storage.s3.prefix", f"{storage.s3.prefix!r} has an empty, . or .. "
                                "segment")
        return config
    pvc = storage.pvc
    if pvc.create and not pvc.size:
        raise InvalidObject(
            "checkpoint.storage.pvc.size", "required when checkpoint.storage.pvc.create is true (e.g. 1Ti)"
        )
    if not pvc.pvc_name:
        raise InvalidObject("checkpoint.storage.pvc.pvcName", "must not be empty")
    return config


PLATFORM_KEY = "dynamo-operator"  # upstream's platform chart nests the operator's values under it


def _fields(type_: type) -> dict[str, type]:
    info = msgspec.inspect.type_info(type_)
    return {f.encode_name: f.type for f in info.fields} if isinstance(info, msgspec.inspect.StructType) else {}


def refuse_unknown_keys(raw: object, type_: type, path: str = "") -> None:
    """Every key of `raw` must be a field of `type_` (recursively): a misspelt setting is refused, naming
    it and the closest field, never ignored."""
    if not isinstance(raw, dict):
        return  # the conversion names the wrong type
    known = {}
    for name, info in _fields(type_).items():
        known[name] = getattr(info, "cls", None)
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            raise InvalidObject(where, f"keys must be strings, got {type(key).__name__} {key!r}")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
            hint = f" - did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"
            raise InvalidObject(where, f"unknown setting{hint}")
        if known[key] is not None:
            refuse_unknown_keys(value, known[key], where)


def _unwrap_platform_shape(raw: dict) -> dict:
    if PLATFORM_KEY not in raw:
        return raw
    if set(raw) != {PLATFORM_KEY}:
        others = ", ".join(sorted(str(k) for k in raw if k != PLATFORM_KEY))
        raise InvalidObject(PLATFORM_KEY, f"give the settings either under {PLATFORM_KEY}: or at the top "
                            f"level, not both (also found: {others})")
    inner = raw[PLATFORM_KEY]
    if inner is None:
        return {}
    if not isinstance(inner, dict):
        raise InvalidObject(PLATFORM_KEY, f"must be a mapping, got {type(inner).__name__}")
    for key in inner:
        if key != "checkpoint":
            raise InvalidObject(f"{PLATFORM_KEY}.{key}", "not a setting of this operator (only "
                                f"{PLATFORM_KEY}.checkpoint is read): remove it")
    return inner


def _default_access_mode(raw: dict) -> None:
    storage = (raw.get("checkpoint") or {}).get("storage") if isinstance(raw.get("checkpoint"), dict) else None
    if isinstance(storage, dict) and "accessMode" not in storage:
        pvc = storage.get("pvc")
        if isinstance(pvc, dict) and pvc.get("create") is True:
            storage["accessMode"] = StorageAccessMode.POD_MOUNT.value


def parse_config(data: str | bytes | dict | None) -> OperatorConfig:
    """Parse YAML/JSON text or a dict; an empty document is the default configuration."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidObject("", f"not UTF-8 text (byte {err.start}): an operator configuration is YAML") from None
    try:
        raw = yaml.safe_load(data) if isinstance(data, str) else data
    except RecursionError:
        raise InvalidObject("", "nested too deeply to be an operator configuration") from None
    except yaml.YAMLError as err:
        raise InvalidObject("", f"not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidObject("", f"operator configuration must be a mapping, got {type(raw).__name__}")
    raw = _unwrap_platform_shape(raw)
    try:
        refuse_unknown_keys(raw, OperatorConfig)
        _default_access_mode(raw)
        return validate_config(convert(raw, OperatorConfig))
    except RecursionError:
        raise InvalidObject("", "nested too deeply to be an operator configuration") from None


def load_config(path: str | Path) -> OperatorConfig:
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise InvalidObject("", f"{path} is a directory; --config names the configuration file") from None
    except OSError as err:
        raise InvalidObject("", f"cannot read {path}: {err.strerror or err}") from None
    try:
        return parse_config(data)
    except InvalidObject as err:
        raise InvalidObject(err.path, f"{err.problem} (in {path})") from None


__all__ = [
    "PLATFORM_KEY",
    "CheckpointConfig",
    "OperatorConfig",
    "PVCStorage",
    "S3Storage",
    "StorageAccessMode",
    "StorageConfig",
    "load_config",
    "parse_config",
    "validate_config",
]

