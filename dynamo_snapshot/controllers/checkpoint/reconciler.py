"""The checkpoint controller: reads the informer caches, decides, writes the difference (SPEC section 4).

Idempotent and restart-safe: the Job has a fixed name (so a second create is AlreadyExists, never a second
Job), status writes carry the resourceVersion they were decided on (a stale cache loses with Conflict and
reconciles again), and a decided phase is never revisited.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import structlog

from dynamo_snapshot.api import (
    COND_JOB_COMPLETED,
    COND_JOB_CREATED,
    TERMINAL_PHASES,
    Condition,
    DynamoCheckpoint,
    DynamoCheckpointStatus,
    InvalidObject,
    Malformed,
    OperatorConfig,
    Phase,
    malformed_of,
    names,
    refuse_out_of_scope,
    to_dict,
)
from dynamo_snapshot.controllers.checkpoint import outcome as outcomes
from dynamo_snapshot.controllers.checkpoint.cleanup import CLEANUP_FINALIZER
from dynamo_snapshot.controllers.checkpoint.finalize import Finalize
from dynamo_snapshot.controllers.checkpoint.ids import (
    MissingAutoCheckpointID,
    artifact_version,
    job_name,
    resolve_checkpoint_id,
)
from dynamo_snapshot.controllers.checkpoint.job import OUTCOME_FINALIZER, build_checkpoint_job
from dynamo_snapshot.controllers.common import (
    FIELD_MANAGER,
    is_deleting,
    metadata,
    owned_by,
    timestamp,
    utcnow,
    with_condition,
)
from dynamo_snapshot.controllers.podshape import MissingContainer
from dynamo_snapshot.controllers.storage import Storage, StorageNotReady, StorageUnavailable
from dynamo_snapshot.controllers.storage_view import StorageView
from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    JOBS,
    LEASES,
    PODS,
    AlreadyExists,
    BadRequest,
    Client,
    Conflict,
    Controller,
    EventRecorder,
    Informer,
    InformerFactory,
    Invalid,
    NotFound,
    ObjectKey,
    Result,
    index_by_label,
    index_by_owner,
    owner_key,
)

log = structlog.get_logger("dynamo_snapshot.controllers.checkpoint")

CHECKPOINT_ID_INDEX = "checkpointID"
OWNER_INDEX = "owner"
JOB_NAME_INDEX = "jobName"

REASON_DISABLED = "CheckpointDisabled"
REASON_DUPLICATE = "DuplicateCheckpointID"
REASON_STORAGE = "StorageUnavailable"
REASON_WAITING_STORAGE = "WaitingForStorage"
REASON_INVALID = "InvalidCheckpoint"
REASON_JOB_CREATED = "JobCreated"
REASON_BACKOFF_IGNORED = "BackoffLimitIgnored"
REASON_FOREIGN_JOB = "JobOwnedByAnotherObject"

DISABLED_MESSAGE = "checkpoint functionality is disabled in the operator configuration"


def index_by_resolved_id(obj: DynamoCheckpoint | Malformed) -> list[str]:
    if isinstance(obj, Malformed):
        return []
    try:
        return [resolve_checkpoint_id(obj)]
    except MissingAutoCheckpointID:
        return []


def _creation_order(obj: DynamoCheckpoint) -> tuple[str, str]:
    return (obj.metadata.creation_timestamp or "", obj.metadata.name)


def checkpoint_informer(factory: InformerFactory, namespace: str | None,
                        indexers: dict[str, Any] | None = None) -> Informer[DynamoCheckpoint | Malformed]:
    """The DynamoCheckpoints as api structs; one that does not fit is cached as a `Malformed` naming the field."""
    return factory.informer(DYNAMO_CHECKPOINTS, namespace=namespace, type=DynamoCheckpoint,
                            on_mismatch=malformed_of(DynamoCheckpoint), indexers=indexers)


class CheckpointController:
    def __init__(
        self,
        client: Client,
        factory: InformerFactory,
        config: OperatorConfig,
        recorder: EventRecorder,
        *,
        namespace: str | None = None,
        workers: int = 4,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.client = client
        self.config = config
        self.recorder = recorder
        self.clock = clock
        self.checkpoints = checkpoint_informer(factory, namespace, {CHECKPOINT_ID_INDEX: index_by_resolved_id})
        self.jobs: Informer[Any] = factory.informer(
            JOBS, namespace=namespace, label_selector=names.LABEL_CHECKPOINT_ID,
            indexers={OWNER_INDEX: index_by_owner})
        self.pods: Informer[Any] = factory.informer(
            PODS, namespace=namespace, label_selector=f"{names.LABEL_IS_CHECKPOINT_SOURCE}=true",
            indexers={JOB_NAME_INDEX: index_by_label(names.LABEL_JOB_NAME)})
        self.leases: Informer[Any] = factory.informer(LEASES, namespace=namespace,
                                                      label_selector=names.LABEL_CHECKPOINT_ID)
        self.storage = StorageView(factory, config, namespace=namespace)
        self.controller = Controller("checkpoint", self.reconcile, workers=workers)
        self.controller.watch(self.checkpoints)
        self.controller.watch(self.jobs, mapper=self._job_owner_keys)
        self.controller.watch(self.leases, mapper=self._checkpoints_with_same_id)
        self.controller.watch(self.storage.daemonsets, mapper=self._undecided_in_namespace)
        self.controller.watch(self.storage.pvcs, mapper=self._undecided_in_namespace)

    # -- mapping related objects to checkpoint keys ------------------------------------------------------
    @staticmethod
    def _job_owner_keys(job: Any) -> list[ObjectKey]:
        namespace = metadata(job).get("namespace", "")
        return [ObjectKey(namespace, ref["name"]) for ref in metadata(job).get("ownerReferences") or []
                if ref.get("kind") == names.CHECKPOINT_KIND]

    def _checkpoints_with_same_id(self, obj: Any) -> list[ObjectKey]:
        namespace = metadata(obj).get("namespace", "")
        checkpoint_id = (metadata(obj).get("labels") or {}).get(names.LABEL_CHECKPOINT_ID, "")
        return [ObjectKey(namespace, c.metadata.name)
                for c in self.checkpoints.store.by_index(CHECKPOINT_ID_INDEX, checkpoint_id)
                if c.metadata.namespace == namespace]

    def _undecided_in_namespace(self, obj: Any) -> list[ObjectKey]:
        namespace = metadata(obj).get("namespace", "")
        return [ObjectKey(namespace, c.metadata.name)
                for c in self.checkpoints.store.by_index("namespace", namespace)
                if isinstance(c, DynamoCheckpoint) and c.status.phase not in TERMINAL_PHASES]

    # -- reconcile -----------------------------------------------------------------------------------------
    async def reconcile(self, key: ObjectKey) -> Result | None:
        ckpt = self.checkpoints.store.get_by_name(key.namespace, key.name)
        if ckpt is None:
            await self._release_jobs_of_gone_checkpoint(key)
            return None
        try:
            if isinstance(ckpt, Malformed):
                return await self._fail_malformed(ckpt)
            return await _Reconcile(self, ckpt).run()
        except Conflict:
            # Our cache was behind the object we wrote; the newer version is on its way to the cache.
            log.info("checkpoint changed while reconciling; reconciling again", namespace=key.namespace,
                     name=key.name)
            return Result(requeue=True)

    async def _fail_malformed(self, obj: Malformed) -> None:
        """Failed once, naming the field; a deleted one is let go (its spec cannot say what to clean)."""
        m = obj.metadata
        if m.deletion_timestamp:
            if CLEANUP_FINALIZER in m.finalizers:
                await self.client.patch(DYNAMO_CHECKPOINTS, m.name, {"metadata": {
                    "finalizers": [f for f in m.finalizers if f != CLEANUP_FINALIZER],
                    "resourceVersion": m.resource_version}}, m.namespace)
            return
        stored = obj.status
        if (stored.phase, stored.message, stored.observed_generation) == (Phase.FAILED, obj.message, m.generation):
            return
        status = {"phase": Phase.FAILED.value, "message": obj.message, "observedGeneration": m.generation}
        await self.client.patch_status(DYNAMO_CHECKPOINTS, m.name, {
            "metadata": {"resourceVersion": m.resource_version}, "status": status}, m.namespace)
        log.warning("checkpoint is invalid", namespace=m.namespace, name=m.name, field=obj.path,
                    problem=obj.problem)
        await self.recorder.warning(obj, REASON_INVALID, obj.message)

    async def _release_jobs_of_gone_checkpoint(self, key: ObjectKey) -> None:
        for job in self.jobs.store.by_index(OWNER_INDEX, owner_key(key.namespace, names.CHECKPOINT_KIND, key.name)):
            await self.release_job(job)

    async def release_job(self, job: dict[str, Any]) -> None:
        """Drop the outcome finalizer: the verdict is recorded (or no longer wanted)."""
        finalizers = metadata(job).get("finalizers") or []
        if OUTCOME_FINALIZER not in finalizers:
            return
        patch = {"metadata": {"finalizers": [f for f in finalizers if f != OUTCOME_FINALIZER],
                              "resourceVersion": metadata(job)["resourceVersion"]}}
        try:
            await self.client.patch(JOBS, metadata(job)["name"], patch, metadata(job)["namespace"])
        except NotFound:
            pass


class _Reconcile:
    """One pass over one DynamoCheckpoint."""

    def __init__(self, ctrl: CheckpointController, ckpt: DynamoCheckpoint):
        self.ctrl = ctrl
        self.ckpt = ckpt
        self.meta = ckpt.metadata
        self.namespace = self.meta.namespace
        self.name = self.meta.name
        self.status = ckpt.status
        self.phase = self.status.phase
        self.checkpoint_id = ""
        self.now = ctrl.clock()
        self.log = log.bind(namespace=self.namespace, name=self.name)

    async def run(self) -> Result | None:
        if self.meta.deletion_timestamp:
            return await Finalize(self.ctrl, self.ckpt).run()
        if self.phase in TERMINAL_PHASES:
            await self._release_decided_job()
            return None
        ckpt = self.ckpt
        try:
            refuse_out_of_scope(ckpt.spec)
            checkpoint_id = resolve_checkpoint_id(ckpt)
        except (InvalidObject, MissingAutoCheckpointID) as err:
            await self._decide(Phase.FAILED, REASON_INVALID, str(err))
            return None
        self.checkpoint_id = checkpoint_id
        owner = self._id_owner()
        if owner is not None:
            await self._decide(Phase.FAILED, REASON_DUPLICATE,
                               f"checkpoint ID {checkpoint_id} is already owned by {owner}")
            return None
        if not self.ctrl.config.checkpoint.enabled:
            await self._write_status(Phase.PENDING, DISABLED_MESSAGE, event=("Warning", REASON_DISABLED))
            return None
        version = artifact_version(ckpt)
        name = job_name(checkpoint_id, version)
        job = self.ctrl.jobs.store.get_by_name(self.namespace, name)
        if job is None and self.phase == Phase.CREATING:
            job = await self._live_job(name)  # the cache may not have seen our own create yet
            if job is None:
                await self._decide(Phase.FAILED, outcomes.REASON_JOB_DELETED,
                                   f"checkpoint Job {name} was deleted before the checkpoint completed",
                                   completed=False)
                return None
        if job is None:
            return await self._create_job(name, version)
        return await self._follow_job(job)

    # -- steps -----------------------------------------------------------------------------------------
    def _id_owner(self) -> str | None:
        """The earlier DynamoCheckpoint of the namespace with the same ID, if any."""
        same = [c for c in self.ctrl.checkpoints.store.by_index(CHECKPOINT_ID_INDEX, self.checkpoint_id)
                if c.metadata.namespace == self.namespace]
        first = min(same, key=_creation_order, default=None)
        if first is None or first.metadata.uid == self.meta.uid:
            return None
        return first.metadata.name

    async def _live_job(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.ctrl.client.get(JOBS, name, self.namespace)
        except NotFound:
            return None

    async def _create_job(self, name: str, version: str) -> Result | None:
        try:
            storage = self.ctrl.storage.resolve(self.namespace)
            body = build_checkpoint_job(self.ckpt, name=name, checkpoint_id=self.checkpoint_id,
                                        artifact_version=version, storage=storage)
        except StorageNotReady as err:
            await self._write_status(Phase.PENDING, str(err))
            return None  # the PVC's creation is an event that brings us back
        except StorageUnavailable as err:
            await self._decide(Phase.FAILED, REASON_STORAGE, str(err), created=False)
            return None
        except MissingContainer as err:
            await self._decide(Phase.FAILED, REASON_INVALID, str(err), created=False)
            return None
        if self.ckpt.spec.job.backoff_limit is not None:
            await self.ctrl.recorder.normal(
                self.ckpt, REASON_BACKOFF_IGNORED,
                f"spec.job.backoffLimit={self.ckpt.spec.job.backoff_limit} is deprecated and ignored: "
                "checkpoint Jobs are always single-attempt")
        try:
            await self.ctrl.client.create(JOBS, body, self.namespace, field_manager=FIELD_MANAGER)
            self.log.info("created checkpoint job", job=name, checkpoint_id=self.checkpoint_id)
            await self.ctrl.recorder.normal(self.ckpt, REASON_JOB_CREATED, f"created checkpoint Job {name}")
        except AlreadyExists:
            pass  # created by an earlier pass whose status write was lost: adopt it below
        except (Invalid, BadRequest) as err:  # a pod the API server refuses (or cannot even read)
            await self._decide(Phase.FAILED, REASON_INVALID,
                               f"the API server rejected checkpoint Job {name}: {err.message}", created=False)
            return None
        await self._write_status(Phase.CREATING, f"checkpoint Job {name} created", job_name=name, storage=storage,
                                 conditions=[(COND_JOB_CREATED, True, REASON_JOB_CREATED, f"created Job {name}")])
        return None

    async def _follow_job(self, job: dict[str, Any]) -> Result | None:
        name = metadata(job)["name"]
        if not owned_by(job, self.meta.uid):
            if is_deleting(job):
                return None  # a previous object's Job on its way out; its deletion brings us back
            if earlier := self._earlier_incarnation(job):
                # deleted and applied again: the garbage collector has yet to remove what the deleted object
                # owned; the Job's deletion brings us back
                await self._write_status(Phase.PENDING, f"waiting for Job {self.namespace}/{name}, left by the "
                                         f"deleted DynamoCheckpoint {self.name} (uid {earlier}), to be removed by "
                                         "the garbage collector")
                return None
            await self._decide(Phase.FAILED, REASON_FOREIGN_JOB,
                               f"Job {self.namespace}/{name} exists but is not owned by this DynamoCheckpoint; "
                               "delete it or give this checkpoint another artifact version", created=False)
            return None
        lease = self.ctrl.leases.store.get_by_name(self.namespace, name)
        # The Job-name label is anyone's to set: only the Job's own pods (owned by its uid) count.
        pods = [p for p in self.ctrl.pods.store.by_index(JOB_NAME_INDEX, name) if owned_by(p, metadata(job)["uid"])]
        verdict = outcomes.decide(job, lease=lease, pods=pods, target=self.ckpt.spec.job.target_container_name,
                                  now=self.now)
        if verdict.phase is None and is_deleting(job):
            verdict = outcomes.Outcome(Phase.FAILED, outcomes.REASON_JOB_DELETED,
                                       f"checkpoint Job {name} was deleted before the checkpoint completed")
        if verdict.phase is None:
            if self.phase != Phase.CREATING or self.status.job_name != name:
                await self._write_status(Phase.CREATING, verdict.message, job_name=name, conditions=[
                    (COND_JOB_CREATED, True, REASON_JOB_CREATED, f"created Job {name}")])
            return Result(requeue_after=verdict.requeue_after) if verdict.requeue_after else None
        decided = await self._decide(verdict.phase, verdict.reason, verdict.message, job_name=name)
        if decided:
            await self.ctrl.release_job(job)
        return None

    def _earlier_incarnation(self, job: dict[str, Any]) -> str | None:
        """The uid of an earlier DynamoCheckpoint of this name that owns ``job`` (it was deleted and this
        one applied in its place), if one does."""
        for ref in metadata(job).get("ownerReferences") or []:
            ours = ref.get("kind") == names.CHECKPOINT_KIND and str(ref.get("apiVersion", "")).startswith(names.GROUP)
            if ours and ref.get("name") == self.name and ref.get("uid") != self.meta.uid:
                return str(ref.get("uid"))
        return None

    async def _release_decided_job(self) -> None:
        name = self.status.job_name
        job = self.ctrl.jobs.store.get_by_name(self.namespace, name) if name else None
        if job is not None and owned_by(job, self.meta.uid):
            await self.ctrl.release_job(job)

    # -- writing -----------------------------------------------------------------------------------------
    async def _decide(self, phase: Phase, reason: str, message: str, *, job_name: str | None = None,
                      created: bool | None = None, completed: bool | None = None) -> bool:
        """Record a terminal phase with its condition and event. Returns False if the write lost a race."""
        conditions: list[tuple[str, bool, str, str]] = []
        if created is False:
            conditions.append((COND_JOB_CREATED, False, reason, message))
        elif phase is Phase.READY or completed is not None or job_name:
            conditions.append((COND_JOB_COMPLETED, phase is Phase.READY, reason, message))
        event = ("Normal" if phase is Phase.READY else "Warning", reason)
        return await self._write_status(phase, message, job_name=job_name, conditions=conditions, event=event)

    async def _write_status(
        self,
        phase: Phase,
        message: str,
        *,
        job_name: str | None = None,
        conditions: list[tuple[str, bool, str, str]] = (),
        event: tuple[str, str] | None = None,
        storage: Storage | None = None,  # where the Job puts the checkpoint (status storageType, location)
    ) -> bool:
        generation = self.meta.generation
        old = self.status
        checkpoint_id = self.checkpoint_id
        condition_list: list[Condition] = old.conditions
        for type_, ok, reason, text in conditions:
            condition_list = with_condition(condition_list, type_, ok, reason, text, generation=generation,
                                            now=self.now)
        status = DynamoCheckpointStatus(
            phase=phase, message=message, observed_generation=generation,
            # identityHash: the deprecated alias, always equal
            checkpoint_id=checkpoint_id or old.checkpoint_id, identity_hash=checkpoint_id or old.identity_hash,
            job_name=job_name or old.job_name, created_at=timestamp(self.now) if phase is Phase.READY
            else old.created_at, conditions=condition_list,
            storage_type=storage.type if storage else old.storage_type,
            location=storage.location(checkpoint_id) if storage and checkpoint_id else old.location,
            staging=old.staging)  # the staging controller's
        if status == old:
            return True
        patch = {"metadata": {"resourceVersion": self.meta.resource_version}, "status": to_dict(status)}
        await self.ctrl.client.patch_status(DYNAMO_CHECKPOINTS, self.name, patch, self.namespace)
        self.log.info("checkpoint status", phase=phase.value, message=message, checkpoint_id=checkpoint_id)
        if event is not None and (phase != self.phase or message != old.message):
            event_type, reason = event
            await self.ctrl.recorder.event(self.ckpt, event_type, reason, message)
        return True
