"""DynamoCheckpoint (nvidia.com/v1alpha1, short name dckpt): SPEC section 2."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from dynamo_snapshot.api import names
from dynamo_snapshot.api.decode import InvalidObject
from dynamo_snapshot.api.meta import Base, Condition, JSONObject, ObjectMeta
from dynamo_snapshot.api.podtemplate import PodTemplateShape, check_shape

BackendFramework = Literal["vllm", "sglang", "trtllm"]
BACKEND_FRAMEWORKS: tuple[str, ...] = ("vllm", "sglang", "trtllm")

PositiveInt = Annotated[int, Meta(ge=1)]
DNSLabel = Annotated[str, Meta(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]


class Phase(StrEnum):
    PENDING = "Pending"
    CREATING = "Creating"
    READY = "Ready"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.READY, Phase.FAILED})

# Condition types and reasons on DynamoCheckpoint.status.conditions
COND_JOB_CREATED = "JobCreated"
COND_JOB_COMPLETED = "JobCompleted"


class Identity(Base):
    """Legacy identity: required by the schema, immutable; decides the ID of standalone checkpoints only."""

    model: str
    backend_framework: BackendFramework
    dynamo_version: str = ""
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    dtype: str = ""
    max_model_len: PositiveInt | None = None
    extra_parameters: dict[str, str] = {}


class CheckpointJob(Base):
    pod_template_spec: JSONObject
    target_container_name: DNSLabel = "main"
    active_deadline_seconds: PositiveInt = 3600
    shared_memory: str | int = "8Gi"  # a quantity: the schema says int-or-string
    # Accepted for compatibility and ignored: checkpoint Jobs are always single-attempt.
    backoff_limit: int | None = None

    def __post_init__(self) -> None:
        check_shape(self.pod_template_spec, PodTemplateShape, "podTemplateSpec")


class GPUMemoryService(Base):
    """Upstream's GMS + Snapshot switch: accepted by the schema, out of scope here (refused when enabled)."""

    enabled: bool = False


class DynamoCheckpointSpec(Base):
    identity: Identity
    job: CheckpointJob
    gpu_memory_service: GPUMemoryService | None = None


def refuse_out_of_scope(spec: DynamoCheckpointSpec) -> None:
    """Features upstream's schema has and this project does not implement: refused by name when enabled."""
    if spec.gpu_memory_service is not None and spec.gpu_memory_service.enabled:
        raise InvalidObject("spec.gpuMemoryService.enabled", "GMS + Snapshot is not supported by dynamo-snapshot "
                            "(upstream disables it too); set it to false or remove spec.gpuMemoryService")


class StagingGPU(Base):
    """The GPU a checkpoint was taken on, from its source node's labels: pre-staging goes only to nodes alike."""

    product: str = ""  # the node label nvidia.com/gpu.product
    driver_version: str = ""  # nvidia.com/cuda.driver-version.full (or major.minor.rev)


class Staging(Base):
    """Pre-staging (docs/agent.md#pre-staging): the nodes whose agents fetch this version into their node
    cache ahead of the pods that restore from it (written by the operator), and where it is staged (the
    agents' reports, copied by the operator)."""

    artifact_version: str = ""
    nodes: list[str] = []
    staged: list[str] = []
    gpu: StagingGPU | None = None


class DynamoCheckpointStatus(Base):
    phase: Phase | None = None
    checkpoint_id: str = msgspec.field(default="", name="checkpointID")
    identity_hash: str = ""  # deprecated alias, always equal to checkpoint_id
    job_name: str = ""
    created_at: str | None = None
    message: str = ""
    conditions: list[Condition] = []
    observed_generation: int = 0
    storage_type: str = ""  # pvc or s3 (upstream: pvc|s3|oci), set when the checkpoint Job is created
    location: str = ""  # <basePath>/<checkpointID> on the PVC, or s3://<bucket>/<prefix>/<checkpointID>
    staging: Staging | None = None  # a Ready checkpoint something restores from (the staging controller's)


class DynamoCheckpoint(Base):
    metadata: ObjectMeta
    spec: DynamoCheckpointSpec
    status: DynamoCheckpointStatus = msgspec.field(default_factory=DynamoCheckpointStatus)
    api_version: str = names.API_VERSION
    kind: str = names.CHECKPOINT_KIND
