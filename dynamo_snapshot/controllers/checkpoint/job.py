"""The checkpoint Job, exactly as SPEC section 4 specifies it."""

from __future__ import annotations

from typing import Any

from dynamo_snapshot.api import DynamoCheckpoint, names
from dynamo_snapshot.controllers.podshape import checkpoint_source_template
from dynamo_snapshot.controllers.storage import Storage

JOB_TTL_SECONDS = 300
# Held on the Job until the operator has recorded its outcome: the TTL controller (or a user) deleting a
# finished Job while the operator is down must not lose the verdict.
OUTCOME_FINALIZER = "nvidia.com/checkpoint-outcome"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def owner_reference(ckpt: DynamoCheckpoint) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.CHECKPOINT_KIND,
        "name": ckpt.metadata.name,
        "uid": ckpt.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_checkpoint_job(
    ckpt: DynamoCheckpoint, *, name: str, checkpoint_id: str, artifact_version: str, storage: Storage | None
) -> dict[str, Any]:
    job_spec = ckpt.spec.job
    template = checkpoint_source_template(
        job_spec.pod_template_spec,
        target=job_spec.target_container_name,
        checkpoint_id=checkpoint_id,
        artifact_version=artifact_version,
        shared_memory=job_spec.shared_memory,
        storage=storage,
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": ckpt.metadata.namespace,
            "labels": {names.LABEL_CHECKPOINT_ID: checkpoint_id},
            "annotations": {
                names.ANN_ARTIFACT_VERSION: artifact_version,
                names.ANN_TARGET_CONTAINERS: job_spec.target_container_name,
            },
            "ownerReferences": [owner_reference(ckpt)],
            "finalizers": [OUTCOME_FINALIZER],
        },
        "spec": {
            "backoffLimit": 0,  # single attempt: a second run could checkpoint a different warm state
            "activeDeadlineSeconds": job_spec.active_deadline_seconds,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": template,
        },
    }
