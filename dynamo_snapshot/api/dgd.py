"""The DynamoGraphDeployment subset this project owns (SPEC section 2)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec
from msgspec import Meta

from dynamo_snapshot.api import names
from dynamo_snapshot.api.checkpoint import BackendFramework
from dynamo_snapshot.api.meta import Base, Condition, JSONObject, ObjectMeta
from dynamo_snapshot.api.podtemplate import MetadataShape, PodSpecShape, ResourcesShape, check_shape


class CheckpointMode(StrEnum):
    AUTO = "Auto"
    MANUAL = "Manual"  # deprecated


class StartupPolicy(StrEnum):
    IMMEDIATE = "Immediate"
    WAIT_FOR_CHECKPOINT = "WaitForCheckpoint"


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class ServiceCheckpoint(Base):
    enabled: bool = False
    mode: CheckpointMode = CheckpointMode.AUTO
    checkpoint_ref: str | None = None
    startup_policy: StartupPolicy = StartupPolicy.IMMEDIATE
    deletion_policy: DeletionPolicy = DeletionPolicy.DELETE
    # Legacy; ignored for DGD-managed automatic checkpoints. Kept loose so partial identities decode.
    identity: JSONObject | None = None


class EnvVar(Base):
    name: str
    value: str | None = None
    value_from: JSONObject | None = None


class Service(Base):
    component_type: str = ""
    replicas: Annotated[int, Meta(ge=0)] = 1
    envs: list[EnvVar] = []
    resources: JSONObject | None = None
    extra_pod_metadata: JSONObject | None = None
    # A PodSpec fragment; its `mainContainer` is the main container.
    extra_pod_spec: JSONObject | None = None
    checkpoint: ServiceCheckpoint | None = None

    def __post_init__(self) -> None:
        check_shape(self.extra_pod_spec, PodSpecShape, "extraPodSpec")
        check_shape(self.extra_pod_metadata, MetadataShape, "extraPodMetadata")
        check_shape(self.resources, ResourcesShape, "resources")


class DynamoGraphDeploymentSpec(Base):
    backend_framework: BackendFramework | None = None
    envs: list[EnvVar] = []
    services: dict[str, Service] = {}


class ComponentCheckpointStatus(Base):
    checkpoint_name: str = ""
    checkpoint_id: str = msgspec.field(default="", name="checkpointID")
    identity_hash: str = ""
    ready: bool = False


class DynamoGraphDeploymentStatus(Base):
    state: str = ""
    conditions: list[Condition] = []
    checkpoints: dict[str, ComponentCheckpointStatus] = {}
    observed_generation: int = 0


class DynamoGraphDeployment(Base):
    metadata: ObjectMeta
    spec: DynamoGraphDeploymentSpec = msgspec.field(default_factory=DynamoGraphDeploymentSpec)
    status: DynamoGraphDeploymentStatus = msgspec.field(default_factory=DynamoGraphDeploymentStatus)
    api_version: str = names.API_VERSION
    kind: str = names.DGD_KIND
