"""The DynamoGraphDeployment subset this project owns (SPEC section 2), and its decoding from the stored
JSON (`decode_dgd`): the struct, with the spec's worker-hash inputs kept as the API server stored them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

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


class StoredSpec(msgspec.Struct):
    """A DGD's worker-hash inputs exactly as stored: each service (the upstream fields this project does
    not model included: `dynamoNamespace`, `subComponentType`...) and the graph's `envs`, as plain JSON.
    The hash is taken over these, never over the struct, which drops what it does not declare: hashing the
    struct would rename every ReplicaSet (a rollout of every DGD) on upgrade (docs/decisions.md)."""

    services: dict[str, Any] = {}
    envs: Any = None

    def service(self, component: str) -> dict[str, Any]:
        return self.services.get(component) or {}

    def graph_envs(self) -> list[Any]:
        return self.envs or []


class _Stored(msgspec.Struct):
    spec: StoredSpec = msgspec.field(default_factory=StoredSpec)


class DynamoGraphDeployment(Base, dict=True):
    metadata: ObjectMeta
    spec: DynamoGraphDeploymentSpec = msgspec.field(default_factory=DynamoGraphDeploymentSpec)
    status: DynamoGraphDeploymentStatus = msgspec.field(default_factory=DynamoGraphDeploymentStatus)
    api_version: str = names.API_VERSION
    kind: str = names.DGD_KIND

    @property
    def stored_spec(self) -> StoredSpec:
        """The spec's worker-hash inputs as stored; set by `decode_dgd` only (not by `convert`, not kept by
        `msgspec.structs.replace`), so a DGD from elsewhere cannot be hashed by accident."""
        stored = self.__dict__.get("_stored_spec")
        if stored is None:
            raise AttributeError(f"DynamoGraphDeployment {self.metadata.namespace}/{self.metadata.name}: no stored "
                                 "spec; decode it from its JSON with api.decode_dgd to hash its workers")
        return stored


_DGD_DECODER = msgspec.json.Decoder(DynamoGraphDeployment)
_STORED_DECODER = msgspec.json.Decoder(_Stored)


def decode_dgd(raw: bytes) -> DynamoGraphDeployment:
    """A DGD from its JSON as the API server sent it, with `stored_spec` set. Raises msgspec.ValidationError
    for one that does not fit (the DGD informer's `on_mismatch` turns that into an `api.Malformed`)."""
    dgd = _DGD_DECODER.decode(raw)
    dgd.__dict__["_stored_spec"] = _STORED_DECODER.decode(raw).spec
    return dgd
