"""The DGD controller: one ReplicaSet per (component, worker hash), automatic checkpoints, startup
policies and restore-shaped pods (SPEC section 5). Reads the caches, plans, writes the difference."""

from __future__ import annotations

import hashlib
from typing import Any

import structlog

from dynamo_snapshot.api import (
    CheckpointMode,
    ComponentCheckpointStatus,
    DeletionPolicy,
    DynamoCheckpoint,
    DynamoGraphDeployment,
    DynamoGraphDeploymentStatus,
    Malformed,
    ServiceCheckpoint,
    decode_dgd,
    find_condition,
    malformed_dgd,
    names,
    to_dict,
)
from dynamo_snapshot.controllers.checkpoint.reconciler import checkpoint_informer
from dynamo_snapshot.controllers.common import (
    FIELD_MANAGER,
    REPLICASETS,
    is_deleting,
    metadata,
    timestamp,
    utcnow,
    with_condition,
)
from dynamo_snapshot.controllers.dgd.plan import REASON_WAITING, ComponentPlan, plan_component
from dynamo_snapshot.controllers.dgd.workload import dgd_owner_reference, replicaset
from dynamo_snapshot.controllers.storage import Storage, StorageNotReady, StorageUnavailable
from dynamo_snapshot.controllers.storage_view import StorageView
from dynamo_snapshot.hashing import marshal
from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    DYNAMO_GRAPH_DEPLOYMENTS,
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
)
from dynamo_snapshot.kube.resources import labels_of, object_key

log = structlog.get_logger("dynamo_snapshot.controllers.dgd")

DGD_INDEX = "dgd"
STATE_PENDING = "pending"
STATE_SUCCESSFUL = "successful"
STATE_FAILED = "failed"


def _dgd_keys_of(obj: Any) -> list[ObjectKey]:
    dgd = labels_of(obj).get(names.LABEL_DGD_NAME)
    return [ObjectKey(object_key(obj).namespace, dgd)] if dgd else []


def dgd_informer(factory: InformerFactory, namespace: str | None) -> Informer[DynamoGraphDeployment | Malformed]:
    """The DGDs as api structs (`api.decode_dgd`: either served version's shape as the services it means,
    the services as stored kept for the worker hash); one that does not fit, or uses what this project does
    not run, is cached as a `Malformed` naming the field. Listed through v1alpha1: with conversion None
    the list says nothing of the version an object was written in, its shape does (`api_version`). Every
    write to a DGD goes through `DYNAMO_GRAPH_DEPLOYMENTS.at_version(dgd.api_version)`: each version's
    schema refuses the other's shape, and a write is validated whole, status included."""
    return factory.informer(DYNAMO_GRAPH_DEPLOYMENTS, namespace=namespace, type=DynamoGraphDeployment,
                            decode=decode_dgd, on_mismatch=malformed_dgd)


def _checkpoint_settings(dgd: DynamoGraphDeployment | Malformed) -> list[ServiceCheckpoint]:
    """The services' `checkpoint` sections (none for a malformed DGD: it is failed, it uses nothing)."""
    if isinstance(dgd, Malformed):
        return []
    return [s.checkpoint for s in dgd.spec.services.values() if s.checkpoint is not None]


def uses_checkpoints(dgd: DynamoGraphDeployment | Malformed) -> bool:
    """upstream: a checkpoint section, checkpointRef included, does nothing unless `enabled` is true."""
    return any(c.enabled for c in _checkpoint_settings(dgd))


class DGDController:
    def __init__(self, client: Client, factory: InformerFactory, config, recorder: EventRecorder, *,
                 namespace: str | None = None, workers: int = 2):
        self.client = client
        self.config = config
        self.recorder = recorder
        self.dgds = dgd_informer(factory, namespace)
        self.replicasets: Informer[Any] = factory.informer(
            REPLICASETS, namespace=namespace, label_selector=names.LABEL_DGD_NAME,
            indexers={DGD_INDEX: index_by_label(names.LABEL_DGD_NAME)})
        self.checkpoints = checkpoint_informer(factory, namespace)
        # the DGDs' pods, for the restores the snapshot agent failed (the reason goes into the status)
        self.pods: Informer[Any] = factory.informer(
            PODS, namespace=namespace, label_selector=names.LABEL_DGD_NAME,
            indexers={DGD_INDEX: index_by_label(names.LABEL_DGD_NAME)})
        self.storage = StorageView(factory, config, namespace=namespace)
        self.controller = Controller("dynamographdeployment", self.reconcile, workers=workers)
        self.controller.watch(self.dgds)
        self.controller.watch(self.replicasets, mapper=_dgd_keys_of)
        self.controller.watch(self.checkpoints, mapper=self._dgds_using)
        self.controller.watch(self.pods, mapper=_dgd_keys_of)

    def _dgds_using(self, ckpt: DynamoCheckpoint | Malformed) -> list[ObjectKey]:
        """A checkpoint's phase matters to its own DGD and to every DGD that references it."""
        keys = _dgd_keys_of(ckpt)
        namespace, name = ckpt.metadata.namespace, ckpt.metadata.name
        for dgd in self.dgds.store.by_index("namespace", namespace):
            if any(c.checkpoint_ref == name or (c.mode is CheckpointMode.MANUAL and c.identity)
                   for c in _checkpoint_settings(dgd)):
                keys.append(ObjectKey(namespace, dgd.metadata.name))
        return keys

    async def reconcile(self, key: ObjectKey) -> Result | None:
        dgd = self.dgds.store.get_by_name(key.namespace, key.name)
        if dgd is None or is_deleting(dgd):
            return None  # owned ReplicaSets and Delete-policy checkpoints go with it (garbage collector)
        try:
            if isinstance(dgd, Malformed):
                return await self._fail_malformed(dgd)
            return await _Reconcile(self, dgd).run()
        except Conflict:
            return Result(requeue=True)

    async def _fail_malformed(self, obj: Malformed) -> None:
        """A DGD that does not fit its schema: `failed` once, its Ready condition naming the field. No
        requeue: only a new generation of the object can change the answer."""
        m, stored = obj.metadata, obj.status
        ready = find_condition(stored.conditions, "Ready")
        if stored.state == STATE_FAILED and ready is not None and ready.message == obj.message:
            return
        condition = {"type": "Ready", "status": "False", "reason": "invalid_spec", "message": obj.message,
                     "lastTransitionTime": timestamp(utcnow()), "observedGeneration": m.generation}
        await self.client.patch_status(DYNAMO_GRAPH_DEPLOYMENTS.at_version(obj.api_version), m.name, {
            "metadata": {"resourceVersion": m.resource_version},
            "status": {"state": STATE_FAILED, "observedGeneration": m.generation, "conditions": [condition]}},
            m.namespace)
        log.warning("deployment is invalid", namespace=m.namespace, name=m.name, field=obj.path,
                    problem=obj.problem)
        await self.recorder.warning(obj, "InvalidSpec", obj.message)


class _Reconcile:
    def __init__(self, ctrl: DGDController, dgd: DynamoGraphDeployment):
        self.ctrl = ctrl
        self.dgd = dgd
        self.namespace = dgd.metadata.namespace
        self.name = dgd.metadata.name
        self.log = log.bind(namespace=self.namespace, name=self.name)

    def _storage(self) -> Storage | None:
        try:
            return self.ctrl.storage.resolve(self.namespace)
        except (StorageUnavailable, StorageNotReady):
            return None

    def _checkpoint_with_id(self, checkpoint_id: str) -> DynamoCheckpoint | None:
        """A Manual-mode identity's checkpoint: the DynamoCheckpoint of the namespace with that ID."""
        for ckpt in self.ctrl.checkpoints.store.by_index("namespace", self.namespace):
            if isinstance(ckpt, DynamoCheckpoint) and checkpoint_id in (
                    ckpt.status.checkpoint_id, ckpt.metadata.labels.get(names.LABEL_CHECKPOINT_ID)):
                return ckpt
        return None

    async def run(self) -> Result | None:
        dgd = self.dgd
        storage = self._storage()
        plans = [
            plan_component(dgd, component, service,
                           get_checkpoint=lambda n: self.ctrl.checkpoints.store.get_by_name(self.namespace, n),
                           storage=storage, find_by_id=self._checkpoint_with_id)
            for component, service in dgd.spec.services.items()
        ]
        problems: list[str] = []
        for plan in plans:
            problems += plan.problems
            try:
                await self._ensure_checkpoint(dgd, plan)
                await self._ensure_generation(dgd, plan)
            except (Invalid, BadRequest) as err:  # the spec builds an object the API server refuses: no retry
                problems.append(f"component {plan.component}: the API server refused {err.message}")
        await self._retire_old_generations(plans)
        checkpoints = {p.component: p.checkpoint_status for p in plans if p.checkpoint_status}
        await self._write_status(self._state(plans, problems), plans, problems, checkpoints)
        return None

    # -- checkpoints -----------------------------------------------------------------------------------
    async def _ensure_checkpoint(self, dgd: DynamoGraphDeployment, plan: ComponentPlan) -> None:
        if plan.auto_checkpoint is not None:
            try:
                await self.ctrl.client.create(DYNAMO_CHECKPOINTS, plan.auto_checkpoint, self.namespace,
                                              field_manager=FIELD_MANAGER)
                self.log.info("created automatic checkpoint", component=plan.component,
                              checkpoint=plan.auto_checkpoint_name, worker_hash=plan.worker_hash)
                await self.ctrl.recorder.normal(dgd, "CheckpointCreated",
                                                f"created checkpoint {plan.auto_checkpoint_name} for component "
                                                f"{plan.component} (worker hash {plan.worker_hash})")
            except AlreadyExists:
                pass  # made by an earlier pass; adopted on the next one
            return
        if plan.auto_checkpoint_name and not plan.problems:
            await self._align_deletion_policy(dgd, plan)

    async def _align_deletion_policy(self, dgd: DynamoGraphDeployment, plan: ComponentPlan) -> None:
        """Delete: the DGD owns the checkpoint. Retain: no owner reference (detached), so it outlives the DGD."""
        ckpt = self.ctrl.checkpoints.store.get_by_name(self.namespace, plan.auto_checkpoint_name)
        if ckpt is None or ckpt.metadata.deletion_timestamp:
            return
        meta = ckpt.metadata
        ours = [r for r in meta.owner_references if r.uid == dgd.metadata.uid]
        want_owner = plan.deletion_policy is DeletionPolicy.DELETE
        policy = meta.annotations.get(names.ANN_DELETION_POLICY)
        if bool(ours) == want_owner and policy == plan.deletion_policy.value:
            return
        others = [to_dict(r) for r in meta.owner_references if r.uid != dgd.metadata.uid]
        patch = {"metadata": {
            "resourceVersion": meta.resource_version,
            "ownerReferences": [*others, dgd_owner_reference(dgd)] if want_owner else others,
            "annotations": {names.ANN_DELETION_POLICY: plan.deletion_policy.value},
        }}
        await self.ctrl.client.patch(DYNAMO_CHECKPOINTS, meta.name, patch, self.namespace)

    # -- workloads --------------------------------------------------------------------------------------
    async def _ensure_generation(self, dgd: DynamoGraphDeployment, plan: ComponentPlan) -> None:
        existing = self.ctrl.replicasets.store.get_by_name(self.namespace, plan.replicaset_name)
        if existing is None:
            body = replicaset(dgd, plan.component, plan.worker_hash, plan.template, plan.replicas)
            body["metadata"]["annotations"] = {names.ANN_POD_TEMPLATE_HASH: template_hash(plan.template)}
            try:
                await self.ctrl.client.create(REPLICASETS, body, self.namespace, field_manager=FIELD_MANAGER)
                self.log.info("created worker generation", component=plan.component,
                              replicaset=plan.replicaset_name, replicas=plan.replicas, restore=plan.restore)
            except AlreadyExists:
                pass
            return
        spec = existing.get("spec") or {}
        patch: dict[str, Any] = {}
        if spec.get("replicas") != plan.replicas:
            patch["replicas"] = plan.replicas
        wanted_hash = template_hash(plan.template)
        meta_patch: dict[str, Any] = {"resourceVersion": metadata(existing)["resourceVersion"]}
        if (metadata(existing).get("annotations") or {}).get(names.ANN_POD_TEMPLATE_HASH) != wanted_hash:
            # Only pods created from now on get the new shape: a ReplicaSet never touches running pods.
            patch["template"] = plan.template
            meta_patch["annotations"] = {names.ANN_POD_TEMPLATE_HASH: wanted_hash}
        if patch:
            await self.ctrl.client.patch(REPLICASETS, plan.replicaset_name,
                                         {"metadata": meta_patch, "spec": patch}, self.namespace)
            self.log.info("updated worker generation", component=plan.component, replicaset=plan.replicaset_name,
                          replicas=plan.replicas, restore=plan.restore)

    async def _retire_old_generations(self, plans: list[ComponentPlan]) -> None:
        """Scale a component's older generations down once its current one is available; delete those
        already at zero. Components no longer in the spec are retired at once."""
        current = {p.component: p for p in plans}
        for rs in self.ctrl.replicasets.store.by_index(DGD_INDEX, self.name):
            meta = metadata(rs)
            if meta.get("namespace") != self.namespace or is_deleting(rs):
                continue
            component = (meta.get("labels") or {}).get(names.LABEL_COMPONENT)
            plan = current.get(component)
            if plan is not None and meta["name"] == plan.replicaset_name:
                continue
            if plan is not None and not self._available(plan):
                continue  # keep serving from the old generation until the new one can
            if (rs.get("spec") or {}).get("replicas", 0) != 0:
                await self.ctrl.client.patch(REPLICASETS, meta["name"], {"spec": {"replicas": 0}}, self.namespace)
                self.log.info("scaled down old worker generation", component=component, replicaset=meta["name"])
            elif not (rs.get("status") or {}).get("replicas"):
                try:
                    await self.ctrl.client.delete(REPLICASETS, meta["name"], self.namespace,
                                                  propagation_policy="Background")
                except NotFound:
                    pass

    def _available(self, plan: ComponentPlan) -> bool:
        rs = self.ctrl.replicasets.store.get_by_name(self.namespace, plan.replicaset_name)
        if rs is None:
            return False
        status = rs.get("status") or {}
        return (status.get("availableReplicas") or 0) >= plan.target_replicas and \
            (rs.get("spec") or {}).get("replicas") == plan.target_replicas

    def _pending(self, plan: ComponentPlan) -> str:
        """The component, and why its restored pods are not coming up where the agent said so."""
        failures = []
        for pod in self.ctrl.pods.store.by_index(DGD_INDEX, self.name):
            meta = metadata(pod)
            labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
            if meta.get("namespace") != self.namespace or labels.get(names.LABEL_COMPONENT) != plan.component \
                    or labels.get(names.LABEL_WORKER_HASH) != plan.worker_hash:
                continue
            for container in (annotations.get(names.ANN_TARGET_CONTAINERS) or "").split(","):
                if annotations.get(names.restore_status_annotation(container)) == names.STATUS_FAILED:
                    why = annotations.get(names.restore_message_annotation(container)) or "see the pod's events"
                    failures.append(f"pod {meta['name']}: restore failed: {why}")
        if not failures:
            return plan.component
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"{plan.component} ({sorted(failures)[0]}{more})"

    # -- status -------------------------------------------------------------------------------------------
    def _state(self, plans: list[ComponentPlan], problems: list[str]) -> str:
        if problems:
            return STATE_FAILED
        if all(self._available(p) and not p.waiting for p in plans):
            return STATE_SUCCESSFUL
        return STATE_PENDING

    async def _write_status(self, state: str, plans: list[ComponentPlan], problems: list[str],
                            checkpoints: dict[str, ComponentCheckpointStatus]) -> None:
        now = utcnow()
        generation = self.dgd.metadata.generation
        old = self.dgd.status
        waiting = [p.waiting for p in plans if p.waiting]
        if problems:
            ready, reason, message = False, "checkpoint_error", "; ".join(problems)
        elif waiting:
            ready, reason = False, REASON_WAITING
            message = "waiting for checkpoints: " + "; ".join(waiting)
        elif state == STATE_SUCCESSFUL:
            ready, reason, message = True, "all_components_available", "all components are available"
        else:
            pending = [self._pending(p) for p in plans if not self._available(p)]
            ready, reason, message = False, "components_pending", "components not yet available: " + ", ".join(pending)
        status = DynamoGraphDeploymentStatus(
            state=state, checkpoints=checkpoints, observed_generation=generation,
            conditions=with_condition(old.conditions, "Ready", ready, reason, message, generation=generation,
                                      now=now))
        if status == old:
            return
        body = to_dict(status)
        body.setdefault("checkpoints", {})  # a merge patch keeps what is left out: say "none" explicitly
        await self.ctrl.client.patch_status(
            DYNAMO_GRAPH_DEPLOYMENTS.at_version(self.dgd.api_version), self.name,
            {"metadata": {"resourceVersion": self.dgd.metadata.resource_version}, "status": body}, self.namespace)
        previous = find_condition(old.conditions, "Ready")
        if problems and message != (previous.message if previous else None):
            await self.ctrl.recorder.warning(self.dgd, "CheckpointError", message)



def template_hash(template: dict[str, Any]) -> str:
    """Of the template as we wrote it: the stored one carries the API server's defaults, so compare this."""
    return hashlib.sha256(marshal(template)).hexdigest()[:16]
