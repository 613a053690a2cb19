"""The checkpoint Job, exactly as SPEC section 4 specifies it."""

from __future__ import annotations

from typing import Any

from dynamo_snapshot.api import DynamoCheckpoint, names
from dynamo_snapshot.controllers.common import controller_reference
from dynamo_snapshot.controllers.podshape import checkpoint_source_template
from dynamo_snapshot.controllers.storage import Storage

JOB_TTL_SECONDS = 300
# Held on the Job until the operator has recorded its outcome: the TTL controller (or a user) deleting a
# finished Job while the operator is down must not lose the verdict.
OUTCOME_FINALIZER = "nvidia.com/checkpoint-outcome"


def owner_reference(ckpt: DynamoCheckpoint) -> dict[str, Any]:
    return controller_reference(names.API_VERSION, names.CHECKPOINT_KIND, ckpt.metadata.name, ckpt.metadata.uid)


def checkpoint_job(
    *,
    name: str,
    namespace: str,
    pod_template: dict[str, Any],
    target: str,
    checkpoint_id: str,
    artifact_version: str,
    shared_memory: str,
    active_deadline_seconds: int,
    storage: Storage | None,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Job that runs one checkpoint source pod. With an owner (the operator's DynamoCheckpoint) it also
    holds the outcome finalizer; snapshotctl's Jobs have neither, as no operator is there to release it."""
    template = checkpoint_source_template(
        pod_template, target=target, checkpoint_id=checkpoint_id, artifact_version=artifact_version,
        shared_memory=shared_memory, storage=storage)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {names.LABEL_CHECKPOINT_ID: checkpoint_id},
        "annotations": {names.ANN_ARTIFACT_VERSION: artifact_version, names.ANN_TARGET_CONTAINERS: target},
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
        metadata["finalizers"] = [OUTCOME_FINALIZER]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 0,  # single attempt: a second run could checkpoint a different warm state
            "activeDeadlineSeconds": active_deadline_seconds,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": template,
        },
    }


def build_checkpoint_job(
    ckpt: DynamoCheckpoint, *, name: str, checkpoint_id: str, artifact_version: str, storage: Storage | None
) -> dict[str, Any]:
    job_spec = ckpt.spec.job
    return checkpoint_job(
        name=name, namespace=ckpt.metadata.namespace, pod_template=job_spec.pod_template_spec,
        target=job_spec.target_container_name, checkpoint_id=checkpoint_id, artifact_version=artifact_version,
        shared_memory=str(job_spec.shared_memory), active_deadline_seconds=job_spec.active_deadline_seconds,
        storage=storage, owner=owner_reference(ckpt))
