"""Where checkpoints live for a namespace (SPEC section 6), decided from the informer caches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dynamo_snapshot.api import OperatorConfig, StorageAccessMode, names

AGENT_CONTAINER = "agent"
CHECKPOINT_VOLUME = "checkpoints"
STORAGE_TYPE_PVC = names.STORAGE_TYPE_PVC


@dataclass(frozen=True)
class Storage:
    mode: StorageAccessMode
    pvc_name: str  # "" with object storage
    base_path: str  # "" with object storage
    type: str = names.STORAGE_TYPE_PVC
    url: str = ""  # object storage: s3://bucket/prefix

    @property
    def pod_mount(self) -> bool:
        return self.mode is StorageAccessMode.POD_MOUNT and self.type == names.STORAGE_TYPE_PVC

    def location(self, checkpoint_id: str) -> str:
        """Where the checkpoint is: ``<basePath>/<id>`` on the PVC, ``s3://bucket/prefix/<id>`` (status)."""
        return f"{self.url or self.base_path}/{checkpoint_id}"


class StorageUnavailable(Exception):
    """Storage is missing and nothing will create it: the checkpoint cannot be taken."""


class StorageNotReady(Exception):
    """Storage is missing but the PVC controller is about to create it: wait."""


def _is_agent_daemonset(ds: Mapping[str, Any]) -> bool:
    return ds.get("metadata", {}).get("labels", {}).get(names.LABEL_APP_COMPONENT) == names.AGENT_COMPONENT


def _agent_mount(namespace: str, daemonsets: Iterable[Mapping[str, Any]]) -> Storage:
    agents = sorted((ds for ds in daemonsets if _is_agent_daemonset(ds)), key=lambda ds: ds["metadata"]["name"])
    if not agents:
        raise StorageUnavailable(f"no snapshot-agent daemonset found in namespace {namespace}")
    ds = agents[0]
    pod_spec = ds.get("spec", {}).get("template", {}).get("spec", {})
    volume = next((v for v in pod_spec.get("volumes", []) if v.get("name") == CHECKPOINT_VOLUME), None)
    claim = (volume or {}).get("persistentVolumeClaim", {}).get("claimName")
    agent = next((c for c in pod_spec.get("containers", []) if c.get("name") == AGENT_CONTAINER), None)
    mount = next((m for m in (agent or {}).get("volumeMounts", []) if m.get("name") == CHECKPOINT_VOLUME), None)
    if not claim or mount is None:
        raise StorageUnavailable(
            f"snapshot-agent daemonset {namespace}/{ds['metadata']['name']} does not mount a PVC-backed "
            f"checkpoint volume (container {AGENT_CONTAINER!r} needs a volume {CHECKPOINT_VOLUME!r} from a PVC)"
        )
    return Storage(StorageAccessMode.AGENT_MOUNT, claim, mount["mountPath"].rstrip("/") or "/")


def missing_pvc_message(namespace: str, pvc_name: str) -> str:
    return (
        f"checkpoint storage PVC {namespace}/{pvc_name} does not exist and checkpoint.storage.pvc.create is false"
    )


def _pod_mount(namespace: str, config: OperatorConfig, pvc_names: Iterable[str]) -> Storage:
    pvc = config.checkpoint.storage.pvc
    if pvc.pvc_name not in set(pvc_names):
        if pvc.create:
            raise StorageNotReady(f"waiting for checkpoint storage PVC {namespace}/{pvc.pvc_name} to be created")
        raise StorageUnavailable(missing_pvc_message(namespace, pvc.pvc_name))
    return Storage(StorageAccessMode.POD_MOUNT, pvc.pvc_name, pvc.base_path)


def resolve_storage(
    namespace: str,
    config: OperatorConfig,
    *,
    daemonsets: Iterable[Mapping[str, Any]] = (),
    pvc_names: Iterable[str] = (),
) -> Storage:
    """agentMount: the agent DaemonSet of the namespace says which PVC and path. podMount: the configured
    PVC of the namespace, at the configured base path. s3: the configured bucket and prefix, no PVC (the
    agents, wherever they run, upload and fetch; none need be in the namespace)."""
    if config.checkpoint.storage.type == names.STORAGE_TYPE_S3:
        return Storage(StorageAccessMode.AGENT_MOUNT, "", "", names.STORAGE_TYPE_S3, config.checkpoint.storage.s3.url())
    if config.checkpoint.storage.access_mode is StorageAccessMode.POD_MOUNT:
        return _pod_mount(namespace, config, pvc_names)
    return _agent_mount(namespace, daemonsets)
