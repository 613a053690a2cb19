"""Operator configuration (a file or ConfigMap, not a CRD): SPEC section 2."""

from __future__ import annotations

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


class StorageConfig(Base):
    type: Literal["pvc"] = "pvc"
    access_mode: StorageAccessMode = StorageAccessMode.AGENT_MOUNT
    pvc: PVCStorage = msgspec.field(default_factory=PVCStorage)


class CheckpointConfig(Base):
    enabled: bool = False
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    cleanup_image: str = "busybox:1.36"


class OperatorConfig(Base):
    checkpoint: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)


def validate_config(config: OperatorConfig) -> OperatorConfig:
    """Cross-field rules the types cannot say."""
    pvc = config.checkpoint.storage.pvc
    if pvc.create and not pvc.size:
        raise InvalidObject(
            "checkpoint.storage.pvc.size", "required when checkpoint.storage.pvc.create is true (e.g. 1Ti)"
        )
    if not pvc.pvc_name:
        raise InvalidObject("checkpoint.storage.pvc.pvcName", "must not be empty")
    return config


def parse_config(data: str | bytes | dict | None) -> OperatorConfig:
    """Parse YAML/JSON text or a dict; an empty document is the default configuration."""
    raw = yaml.safe_load(data) if isinstance(data, str | bytes) else data
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidObject("", f"operator configuration must be a mapping, got {type(raw).__name__}")
    return validate_config(convert(raw, OperatorConfig))


def load_config(path: str | Path) -> OperatorConfig:
    try:
        return parse_config(Path(path).read_text())
    except InvalidObject as err:
        raise InvalidObject(err.path, f"{err.problem} (in {path})") from None
    except yaml.YAMLError as err:
        raise InvalidObject("", f"{path} is not valid YAML: {err}") from None


__all__ = [
    "CheckpointConfig",
    "OperatorConfig",
    "PVCStorage",
    "StorageAccessMode",
    "StorageConfig",
    "load_config",
    "parse_config",
    "validate_config",
]

