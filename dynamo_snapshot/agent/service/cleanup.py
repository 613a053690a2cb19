"""Deleting a checkpoint from object storage when its DynamoCheckpoint is deleted. The agents hold the S3
credentials and the operator holds none, so the operator asks and one agent does it (docs/decisions.md,
"Deleting a checkpoint from object storage").

    request   a DynamoCheckpoint being deleted, still held by the cleanup finalizer, whose condition
              ArtifactsRemoved is False with reason Requested - written by the operator once its checkpoint
              Job and that Job's Lease are gone, so that nothing writes the checkpoint any more
    claim     the Lease ``checkpoint-cleanup-<id>`` in the checkpoint's namespace, owned by the DynamoCheckpoint
              (garbage-collected with it) and labelled with its ID: created, or taken over once its holder
              let it expire; a live one of another agent is left to it (looked at again later); a completed
              one of this DynamoCheckpoint means done
    own       the checkpoint ID (status, else label) must be the one its labels and identity derive in its
              namespace (``hashing.derived_dgd_checkpoint_id``): every namespace shares the bucket, so an object
              naming another namespace's ID is refused - the outcome says so and nothing is deleted
    delete    ``objectstore.delete_checkpoint``: every object below ``<prefix>/<id>/`` (every version), the
              manifests first, nothing else
    report    the outcome on the Lease: ``completed`` and what was removed, or ``failed`` and why (retried
              after ``RETRY_S`` while the Lease is ours); the operator reads it and lets the object go

A restore of the checkpoint meanwhile: one past its fetch reads its pinned node cache entry and is unharmed
(the entry goes when it ends); one still fetching fails cleanly at the next missing object, before the
placeholder is touched, and the cache keeps nothing of it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog

from dynamo_snapshot.agent.artifact.objectstore import ObjectStoreError
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.service.lease import live_holder
from dynamo_snapshot.agent.service.staging import checkpoint_id_of
from dynamo_snapshot.api import names
from dynamo_snapshot.hashing import derived_dgd_checkpoint_id
from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    LEASES,
    AlreadyExists,
    Client,
    Conflict,
    Controller,
    InformerFactory,
    KubeError,
    NotFound,
    ObjectKey,
    Result,
)

log = structlog.get_logger(__name__)

RETRY_S = 30.0  # a failed delete is tried again after this long
LEASE_S = 120  # a holder that wrote nothing for this long is presumed gone: another agent takes over


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def cleanup_requested(ckpt: dict[str, Any]) -> bool:
    """Whether the operator asks the agents to remove this DynamoCheckpoint's objects."""
    meta, status = _meta(ckpt), ckpt.get("status") or {}
    if not meta.get("deletionTimestamp") or names.FINALIZER_CHECKPOINT_CLEANUP not in (meta.get("finalizers") or []):
        return False
    if status.get("storageType") == names.STORAGE_TYPE_PVC:
        return False  # a PVC's checkpoint: the operator's cleanup Job removes it
    return any(c.get("type") == names.CONDITION_ARTIFACTS_REMOVED and c.get("status") == "False"
               and c.get("reason") == names.REASON_CLEANUP_REQUESTED for c in status.get("conditions") or [])


def refusal(ckpt: dict[str, Any], checkpoint_id: str) -> str:
    """Why this object may not have ``checkpoint_id`` deleted from the shared bucket ("" when it may)."""
    meta = _meta(ckpt)
    extra = ((ckpt.get("spec") or {}).get("identity") or {}).get("extraParameters") or {}
    derived = derived_dgd_checkpoint_id(meta.get("namespace", ""), meta.get("labels") or {}, extra)
    if derived == checkpoint_id:
        return ""
    return (f"not removed: checkpoint ID {checkpoint_id} is not the one DynamoCheckpoint "
            f"{meta.get('namespace')}/{meta.get('name')} derives in its namespace ({derived or 'none'}, from its "
            "DGD labels and identity); the bucket is shared, so only a namespace's own IDs are deleted")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Cleaner:
    def __init__(self, client: Client, factory: InformerFactory, remote: ObjectStorage, *,
                 watched_namespace: str | None, identity: str):
        self.client, self.remote, self.identity = client, remote, identity
        self.checkpoints = factory.informer(DYNAMO_CHECKPOINTS, namespace=watched_namespace)  # the stager's
        self.controller = Controller("snapshot-agent-cleanup", self.reconcile, workers=1)
        self.controller.watch(self.checkpoints)

    async def reconcile(self, key: ObjectKey) -> Result | None:
        ckpt = self.checkpoints.store.get_by_name(key.namespace, key.name)
        if not isinstance(ckpt, dict) or not cleanup_requested(ckpt) or not (checkpoint_id := checkpoint_id_of(ckpt)):
            return None
        bound = log.bind(namespace=key.namespace, name=key.name, checkpoint_id=checkpoint_id)
        try:
            lease = await self._claim(ckpt, checkpoint_id)
            if not isinstance(lease, dict):
                return lease  # done, or another agent's
            if why := refusal(ckpt, checkpoint_id):
                bound.warning("checkpoint objects not removed", reason=why)
                await self._report(ckpt, checkpoint_id, lease, names.STATUS_FAILED, why)
                return None
            where = self.remote.checkpoint_url(checkpoint_id) + "/"
            try:
                removed = await self.remote.delete(checkpoint_id)
            except (ObjectStoreError, OSError) as exc:
                bound.warning("removing checkpoint objects failed; retried", location=where, error=str(exc))
                await self._report(ckpt, checkpoint_id, lease, names.STATUS_FAILED, f"removing {where} failed: {exc}")
                return Result(requeue_after=RETRY_S)
            bound.info("checkpoint objects removed", location=where, objects=removed)
            await self._report(ckpt, checkpoint_id, lease, names.STATUS_COMPLETED,
                               f"removed {removed} objects under {where} (agent {self.identity})")
        except (Conflict, NotFound, AlreadyExists):
            return Result(requeue=True)  # raced another agent (or the object went): look again
        except KubeError as exc:
            bound.warning("checkpoint cleanup Lease not written; retried", error=str(exc))
            return Result(requeue_after=RETRY_S)
        return None

    def _body(self, ckpt: dict[str, Any], checkpoint_id: str, existing: dict[str, Any] | None, status: str,
              message: str) -> dict[str, Any]:
        meta, now = _meta(ckpt), _now()
        mine = existing is not None and (existing.get("spec") or {}).get("holderIdentity") == self.identity
        metadata: dict[str, Any] = {
            "name": names.CLEANUP_LEASE_PREFIX + checkpoint_id, "namespace": meta.get("namespace"),
            "labels": {names.LABEL_CHECKPOINT_ID: checkpoint_id},
            "annotations": {names.ANN_CLEANUP_STATUS: status, names.ANN_CLEANUP_MESSAGE: message},
            "ownerReferences": [{"apiVersion": names.API_VERSION, "kind": names.CHECKPOINT_KIND,
                                 "name": meta.get("name"), "uid": meta.get("uid")}]}
        if existing is not None:
            metadata["resourceVersion"] = _meta(existing).get("resourceVersion")
        acquired = (existing or {}).get("spec", {}).get("acquireTime") if mine else None
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": LEASE_S,
                         "acquireTime": acquired or now, "renewTime": now}}

    async def _claim(self, ckpt: dict[str, Any], checkpoint_id: str) -> dict[str, Any] | Result | None:
        """Our cleanup Lease (created or taken over), or what to return: None when done, a Result when
        another agent holds it."""
        namespace, name = _meta(ckpt).get("namespace", ""), names.CLEANUP_LEASE_PREFIX + checkpoint_id
        starting = (names.STATUS_IN_PROGRESS, f"removing {self.remote.checkpoint_url(checkpoint_id)}/")
        try:
            current = await self.client.get(LEASES, name, namespace)
        except NotFound:
            return await self.client.create(LEASES, self._body(ckpt, checkpoint_id, None, *starting), namespace)
        annotations = _meta(current).get("annotations") or {}
        ours = any(ref.get("uid") == _meta(ckpt).get("uid") for ref in _meta(current).get("ownerReferences") or [])
        if ours and annotations.get(names.ANN_CLEANUP_STATUS) == names.STATUS_COMPLETED:
            return None
        holder = live_holder(current, datetime.now(UTC))
        if holder not in (None, self.identity) and ours:
            return Result(requeue_after=LEASE_S / 4)  # another agent is at it: look again in a while
        return await self.client.update(LEASES, self._body(ckpt, checkpoint_id, current, *starting), namespace)

    async def _report(self, ckpt: dict[str, Any], checkpoint_id: str, lease: dict[str, Any], status: str,
                      message: str) -> None:
        await self.client.update(LEASES, self._body(ckpt, checkpoint_id, lease, status, message),
                                 _meta(ckpt).get("namespace", ""))
