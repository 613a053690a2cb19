"""Which checkpoint ID a DynamoCheckpoint stands for (SPEC section 3, resolution order)."""

from __future__ import annotations

from dynamo_snapshot.api import DynamoCheckpoint, names
from dynamo_snapshot.hashing import identity_hash


class MissingAutoCheckpointID(ValueError):
    pass


def is_auto_checkpoint(ckpt: DynamoCheckpoint) -> bool:
    return ckpt.metadata.annotations.get(names.ANN_AUTO_CHECKPOINT) == "true"


def resolve_checkpoint_id(ckpt: DynamoCheckpoint) -> str:
    """Auto-created objects: the ID label, required (their identity is synthesized and never decides).
    Standalone: status.checkpointID, status.identityHash, the label, then the legacy identity hash - so an
    ID once recorded never changes, even if the hash definition did."""
    label = ckpt.metadata.labels.get(names.LABEL_CHECKPOINT_ID, "")
    if is_auto_checkpoint(ckpt):
        if not label:
            raise MissingAutoCheckpointID(
                f"automatic checkpoint {ckpt.metadata.namespace}/{ckpt.metadata.name} has no "
                f"{names.LABEL_CHECKPOINT_ID} label; it is set by the DynamoGraphDeployment controller"
            )
        return label
    return ckpt.status.checkpoint_id or ckpt.status.identity_hash or label or identity_hash(ckpt.spec.identity)


def job_name(checkpoint_id: str, artifact_version: str) -> str:
    return f"checkpoint-job-{checkpoint_id}-{artifact_version}"


def artifact_version(ckpt: DynamoCheckpoint) -> str:
    return ckpt.metadata.annotations.get(names.ANN_ARTIFACT_VERSION) or names.DEFAULT_ARTIFACT_VERSION
