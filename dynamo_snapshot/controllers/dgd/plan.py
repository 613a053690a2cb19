"""What one DGD component should look like now: pure planning over the informer caches' contents."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynamo_snapshot.api import (
    CheckpointMode,
    ComponentCheckpointStatus,
    DeletionPolicy,
    DynamoCheckpoint,
    DynamoGraphDeployment,
    Malformed,
    Phase,
    Service,
    ServiceCheckpoint,
    StartupPolicy,
)
from dynamo_snapshot.controllers.checkpoint.ids import MissingAutoCheckpointID, artifact_version, resolve_checkpoint_id
from dynamo_snapshot.controllers.dgd.autocheckpoint import (
    AutoCheckpointMismatch,
    Generation,
    build_auto_checkpoint,
    check_adoptable,
)
from dynamo_snapshot.controllers.dgd.workload import (
    DEFAULT_SHARED_MEMORY,
    MAIN_CONTAINER,
    pod_template,
    replicaset_name,
)
from dynamo_snapshot.controllers.podshape import restore_template, shared_memory_volume
from dynamo_snapshot.controllers.storage import Storage
from dynamo_snapshot.hashing import identity_hash, worker_hash

REASON_WAITING = "waiting_for_checkpoint"


@dataclass
class ComponentPlan:
    component: str
    worker_hash: str
    replicaset_name: str
    template: dict[str, Any]
    replicas: int  # what the generation's ReplicaSet should run now
    target_replicas: int  # what the user asked for: the new generation is "available" at this many
    checkpointing: bool = False
    auto_checkpoint: dict[str, Any] | None = None  # to create when absent
    auto_checkpoint_name: str | None = None
    deletion_policy: DeletionPolicy = DeletionPolicy.DELETE
    checkpoint_status: ComponentCheckpointStatus | None = None
    restore: bool = False
    waiting: str | None = None  # why replicas are held at 0
    problems: list[str] = field(default_factory=list)


def _checkpoint_view(found: DynamoCheckpoint | Malformed | None) -> tuple[DynamoCheckpoint | None, str]:
    if not isinstance(found, DynamoCheckpoint):
        return None, ""
    try:
        return found, resolve_checkpoint_id(found)
    except MissingAutoCheckpointID:
        return None, ""


def _target_of(template: dict[str, Any], wanted: str) -> str | None:
    """The container `targetContainerName` names; the default `main` also means the main container under
    another name (`extraPodSpec.mainContainer.name`), as before the field existed."""
    containers = [c.get("name") for c in template["spec"]["containers"]]
    if wanted in containers:
        return wanted
    return containers[0] if wanted == MAIN_CONTAINER else None


def plan_component(
    dgd: DynamoGraphDeployment,
    component: str,
    service: Service,
    *,
    get_checkpoint: Callable[[str], DynamoCheckpoint | Malformed | None],
    storage: Storage | None,
    find_by_id: Callable[[str], DynamoCheckpoint | None] = lambda _id: None,
) -> ComponentPlan:
    """`dgd` as `api.decode_dgd` gives it: the worker hash is taken over the service as stored."""
    stored = dgd.stored_spec
    whash = worker_hash(component, stored.service(component), stored.graph_envs())
    template = pod_template(dgd, component, service, whash)
    settings = service.checkpoint
    # upstream: a checkpoint section, checkpointRef included, does nothing unless enabled is true
    enabled = settings is not None and settings.enabled
    target = _target_of(template, settings.target_container_name if enabled else MAIN_CONTAINER)
    template = shared_memory_volume(template, [target or template["spec"]["containers"][0]["name"]],
                                    DEFAULT_SHARED_MEMORY)
    plan = ComponentPlan(component, whash, replicaset_name(dgd.metadata.name, component, whash), template,
                         service.replicas, service.replicas)
    if not enabled:
        return plan
    if target is None:
        containers = ", ".join(c.get("name") for c in template["spec"]["containers"])
        plan.problems.append(f"component {component}: checkpoint.targetContainerName "
                             f"{settings.target_container_name} is not a container of its pod ({containers})")
        return plan
    plan.checkpointing = True
    plan.deletion_policy = settings.deletion_policy

    if settings.checkpoint_ref:
        raw = get_checkpoint(settings.checkpoint_ref)
        ckpt, checkpoint_id = _checkpoint_view(raw)
        name = settings.checkpoint_ref
        if raw is None:
            plan.problems.append(f"component {component}: checkpointRef {name} not found in namespace "
                                 f"{dgd.metadata.namespace}")
    elif settings.mode is CheckpointMode.AUTO:
        gen = Generation(dgd.metadata.namespace, dgd.metadata.name, dgd.metadata.uid, component, whash)
        name = gen.checkpoint_name
        plan.auto_checkpoint_name = name
        raw = get_checkpoint(name)
        ckpt, checkpoint_id = _checkpoint_view(raw)
        if raw is None:
            if not dgd.spec.backend_framework:
                plan.problems.append(f"component {component}: spec.backendFramework is required for automatic "
                                     "checkpoints (vllm, sglang or trtllm)")
            else:
                plan.auto_checkpoint = build_auto_checkpoint(dgd, gen, template, settings.deletion_policy, target)
            checkpoint_id = gen.checkpoint_id
        elif ckpt is not None:
            try:
                check_adoptable(ckpt, gen)
            except AutoCheckpointMismatch as err:
                plan.problems.append(f"component {component}: {err}")
                ckpt = None
    elif settings.identity:  # Manual (deprecated): the checkpoint whose ID is the identity's legacy hash
        checkpoint_id = identity_hash(settings.identity)
        ckpt = find_by_id(checkpoint_id)
        name = ckpt.metadata.name if ckpt is not None else ""
    else:  # Manual with neither: the CRD refuses it; an object stored before that rule still lands here
        plan.problems.append(f"component {component}: checkpoint Manual mode requires checkpointRef or "
                             "identity to be set")
        return plan

    _restore_or_wait(plan, component, name, checkpoint_id, ckpt, template, target, storage, settings)
    return plan



def _restore_or_wait(plan: ComponentPlan, component: str, name: str, checkpoint_id: str,
                     ckpt: DynamoCheckpoint | None, template: dict[str, Any], target: str,
                     storage: Storage | None, settings: ServiceCheckpoint) -> None:
    """The checkpoint's part of ``plan``: a restore-shaped template once it is Ready, else (with
    ``WaitForCheckpoint``) no replicas and why."""
    phase = ckpt.status.phase if ckpt is not None else None
    ready = phase is Phase.READY
    plan.checkpoint_status = ComponentCheckpointStatus(checkpoint_name=name, checkpoint_id=checkpoint_id,
                                                       identity_hash=checkpoint_id, ready=ready)
    if ready and ckpt is not None:
        if storage is None:
            plan.problems.append(f"component {component}: checkpoint {name} is Ready but checkpoint storage is "
                                 "unavailable in this namespace; starting cold")
        else:
            plan.restore = True
            plan.template = restore_template(
                template, targets=[target], checkpoint_id=checkpoint_id,
                artifact_version=artifact_version(ckpt), storage=storage,
                cold_fallback=settings.startup_policy is StartupPolicy.IMMEDIATE)
    if settings.startup_policy is StartupPolicy.WAIT_FOR_CHECKPOINT and not plan.restore:
        plan.replicas = 0
        if phase is Phase.FAILED:
            plan.waiting = (f"{component}: checkpoint {name} failed ({ckpt.status.message}); "
                            "startupPolicy WaitForCheckpoint keeps it at 0 replicas")
        elif not name:
            plan.waiting = f"{component}: waiting for a DynamoCheckpoint with checkpoint ID {checkpoint_id}"
        else:
            plan.waiting = f"{component}: waiting for checkpoint {name} to become Ready"
