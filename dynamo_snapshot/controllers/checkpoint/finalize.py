"""A deleted DynamoCheckpoint with the cleanup finalizer: its artifacts removed before it goes.

Stages: the checkpoint Job (if still there) released and deleted first, so nothing writes the artifact
while it is removed; then the cleanup Job created; its success releases the finalizer, its failure is
retried after CLEANUP_RETRY_SECONDS; storage that cannot be resolved releases it with a Warning event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from dynamo_snapshot.api import DynamoCheckpoint, InvalidObject, names
from dynamo_snapshot.controllers.checkpoint import outcome as outcomes
from dynamo_snapshot.controllers.checkpoint.cleanup import (
    CLEANUP_FINALIZER,
    UnsafeCleanupPath,
    build_cleanup_job,
    cleanup_target,
)
from dynamo_snapshot.controllers.common import FIELD_MANAGER, is_deleting, metadata, owned_by
from dynamo_snapshot.controllers.storage import StorageNotReady, StorageUnavailable
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
