"""A deleted DynamoCheckpoint with the cleanup finalizer: its artifacts removed before it goes.

Stages: the checkpoint Job (if still there) released and deleted first, so nothing writes the artifact
while it is removed; then

    pvc   the cleanup Job created; its success releases the finalizer, its failure is retried after
          CLEANUP_RETRY_SECONDS
    s3    (``ObjectCleanup``) the operator holds no S3 credentials, so it asks the agents: once the Job's
          Lease is gone too (an agent may still be uploading under it), the condition ArtifactsRemoved
          False/Requested; one agent removes every object under ``<prefix>/<id>/`` and reports on its Lease
          ``checkpoint-cleanup-<id>`` (agent/service/cleanup.py): completed releases the finalizer, failed
          is an event (the agent retries). Only an ID this namespace derives is asked for: the bucket is
          shared by every namespace

Storage that cannot be resolved, or an ID that is not the namespace's, releases it with a Warning event.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import structlog

from dynamo_snapshot.api import DynamoCheckpoint, InvalidObject, find_condition, names, to_dict
from dynamo_snapshot.controllers.checkpoint import outcome as outcomes
from dynamo_snapshot.controllers.checkpoint.cleanup import (
    CLEANUP_FINALIZER,
    UnsafeCleanupPath,
    build_cleanup_job,
    cleanup_target,
)
from dynamo_snapshot.controllers.common import FIELD_MANAGER, is_deleting, metadata, owned_by, with_condition
from dynamo_snapshot.controllers.storage import Storage, StorageNotReady, StorageUnavailable
from dynamo_snapshot.hashing import derived_dgd_checkpoint_id
from dynamo_snapshot.kube import DYNAMO_CHECKPOINTS, JOBS, AlreadyExists, NotFound, Result

if TYPE_CHECKING:
    from dynamo_snapshot.controllers.checkpoint.reconciler import CheckpointController

log = structlog.get_logger("dynamo_snapshot.controllers.checkpoint")

REASON_CLEANUP_STARTED = "CleanupStarted"
REASON_CLEANUP_DONE = "CleanupSucceeded"
REASON_CLEANUP_FAILED = "CleanupFailed"
REASON_CLEANUP_SKIPPED = "CleanupSkipped"
CLEANUP_RETRY_SECONDS = 30


class Finalize:
    """A deleted automatic checkpoint: stop its checkpoint Job, then run the cleanup Job that removes
    `<basePath>/<id>`; the finalizer holds the object until that Job succeeds."""

    def __init__(self, ctrl: CheckpointController, ckpt: DynamoCheckpoint):
        self.ctrl = ctrl
        self.ckpt = ckpt
        self.meta = ckpt.metadata
        self.namespace = self.meta.namespace
        self.log = log.bind(namespace=self.namespace, name=self.meta.name)

    async def run(self) -> Result | None:
        if CLEANUP_FINALIZER not in self.meta.finalizers:
            return None
        running = self._own_job(self.ckpt.status.job_name)
        if running is not None:
            # Nothing may write the artifact while it is removed: the checkpoint Job goes first.
            await self.ctrl.release_job(running)
            if not is_deleting(running):
                await self.ctrl.client.delete(JOBS, metadata(running)["name"], self.namespace,
                                              propagation_policy="Foreground")
            return None  # its deletion brings us back
        checkpoint_id = self.ckpt.status.checkpoint_id or self.meta.labels.get(names.LABEL_CHECKPOINT_ID, "")
        if not checkpoint_id:
            return await self._release("no checkpoint ID was ever recorded: nothing to clean up")
        try:
            storage = self.ctrl.storage.resolve(self.namespace)
            if storage.type == names.STORAGE_TYPE_S3:
                return await ObjectCleanup(self, storage, checkpoint_id).run()
            body = build_cleanup_job(self.ckpt, checkpoint_id, storage, self.ctrl.config.checkpoint.cleanup_image)
        except (StorageUnavailable, StorageNotReady, UnsafeCleanupPath, InvalidObject) as err:
            await self.ctrl.recorder.warning(self.ckpt, REASON_CLEANUP_SKIPPED,
                                             f"artifacts of checkpoint {checkpoint_id} not removed: {err}")
            return await self._release(str(err))
        name = body["metadata"]["name"]
        job = self._own_job(name)
        if job is None:
            try:
                await self.ctrl.client.create(JOBS, body, self.namespace, field_manager=FIELD_MANAGER)
                await self.ctrl.recorder.normal(self.ckpt, REASON_CLEANUP_STARTED,
                                                f"removing checkpoint artifacts with Job {name}")
            except AlreadyExists:
                pass
            return None
        if outcomes.job_condition(job, names.JOB_COMPLETE):
            removed = cleanup_target(storage.base_path, checkpoint_id)
            await self.ctrl.recorder.normal(self.ckpt, REASON_CLEANUP_DONE, f"removed {removed}")
            return await self._release("artifacts removed")
        failed = outcomes.job_condition(job, names.JOB_FAILED)
        if failed:
            wait = CLEANUP_RETRY_SECONDS - outcomes.seconds_since(failed.get("lastTransitionTime"), self.ctrl.clock())
            if wait > 0:
                return Result(requeue_after=wait)
            await self.ctrl.recorder.warning(self.ckpt, REASON_CLEANUP_FAILED,
                                             f"cleanup Job {name} failed ({failed.get('message', '')}); retrying")
            await self.ctrl.client.delete(JOBS, name, self.namespace, propagation_policy="Background")
        return None

    def _own_job(self, name: str | None) -> dict[str, Any] | None:
        job = self.ctrl.jobs.store.get_by_name(self.namespace, name) if name else None
        return job if job is not None and owned_by(job, self.meta.uid) else None

    async def _release(self, why: str) -> None:
        finalizers = [f for f in self.meta.finalizers if f != CLEANUP_FINALIZER]
        try:
            await self.ctrl.client.patch(DYNAMO_CHECKPOINTS, self.meta.name, {"metadata": {
                "finalizers": finalizers, "resourceVersion": self.meta.resource_version}}, self.namespace)
        except NotFound:
            return None
        self.log.info("checkpoint finalized", why=why)
        return None


class ObjectCleanup:
    """A deleted automatic checkpoint in object storage: the agents asked to remove its objects."""

    def __init__(self, finalize: Finalize, storage: Storage, checkpoint_id: str):
        self.finalize, self.ctrl, self.ckpt = finalize, finalize.ctrl, finalize.ckpt
        self.namespace, self.checkpoint_id = finalize.namespace, checkpoint_id
        self.where = storage.location(checkpoint_id) + "/"

    async def run(self) -> Result | None:
        ckpt, now = self.ckpt, self.ctrl.clock()
        job_lease = self.ctrl.leases.store.get_by_name(self.namespace, ckpt.status.job_name) \
            if ckpt.status.job_name else None
        if (wait := outcomes.lease_remaining(job_lease, now)) > 0:
            return Result(requeue_after=wait)  # an agent may still be uploading under it
        derived = derived_dgd_checkpoint_id(self.namespace, ckpt.metadata.labels, ckpt.spec.identity.extra_parameters)
        if derived != self.checkpoint_id:
            why = (f"objects of checkpoint {self.checkpoint_id} not removed from {self.where}: its ID is not the "
                   f"one this namespace's DynamoGraphDeployment labels derive ({derived or 'none'}), and the bucket "
                   "is shared by every namespace")
            await self.ctrl.recorder.warning(ckpt, REASON_CLEANUP_SKIPPED, why)
            return await self.finalize._release(why)
        lease = self.ctrl.leases.store.get_by_name(self.namespace, names.CLEANUP_LEASE_PREFIX + self.checkpoint_id)
        annotations = metadata(lease).get("annotations") or {} if lease and owned_by(lease, ckpt.metadata.uid) else {}
        status, message = annotations.get(names.ANN_CLEANUP_STATUS), annotations.get(names.ANN_CLEANUP_MESSAGE, "")
        if status == names.STATUS_COMPLETED:
            await self.ctrl.recorder.normal(ckpt, REASON_CLEANUP_DONE, message or f"removed {self.where}")
            return await self.finalize._release("objects removed")
        if await self._request(now):
            await self.ctrl.recorder.normal(ckpt, REASON_CLEANUP_STARTED,
                                            f"asked the snapshot agents to remove {self.where}")
        elif status == names.STATUS_FAILED:
            await self.ctrl.recorder.warning(ckpt, REASON_CLEANUP_FAILED, f"{message}; the agent retries")
        return None  # the agent's Lease brings us back

    async def _request(self, now: dt.datetime) -> bool:
        """The condition that asks the agents; False when it is there already."""
        conditions = self.ckpt.status.conditions
        current = find_condition(conditions, names.CONDITION_ARTIFACTS_REMOVED)
        if current is not None and (current.status, current.reason) == ("False", names.REASON_CLEANUP_REQUESTED):
            return False
        wanted = with_condition(conditions, names.CONDITION_ARTIFACTS_REMOVED, False, names.REASON_CLEANUP_REQUESTED,
                                f"waiting for a snapshot agent to remove {self.where}",
                                generation=self.ckpt.metadata.generation, now=now)
        await self.ctrl.client.patch_status(DYNAMO_CHECKPOINTS, self.ckpt.metadata.name, {
            "metadata": {"resourceVersion": self.ckpt.metadata.resource_version},
            "status": {"conditions": [to_dict(c) for c in wanted]}}, self.namespace)
        self.finalize.log.info("checkpoint objects: removal requested", checkpoint_id=self.checkpoint_id,
                               location=self.where)
        return True
