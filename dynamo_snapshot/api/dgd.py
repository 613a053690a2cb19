"""The DynamoGraphDeployment subset this project owns (SPEC section 2), and its decoding from the stored
JSON (`decode_dgd`).

Stages of `decode_dgd`: a stored DGD in either served version's shape (`api.dgdshape` makes a v1beta1
`spec.components` one the `spec.services` it means) -> the struct, with the spec's worker-hash inputs kept
as stored (in the services shape) -> `refuse_unsupported` names the upstream features this project accepts
but does not run. Any of these failing is a msgspec.ValidationError naming the field (`api.Malformed`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dynamo_snapshot.api import names
from dynamo_snapshot.api.checkpoint import BackendFramework
from dynamo_snapshot.api.decode import InvalidObject, Malformed, Refused, convert, malformed_of
from dynamo_snapshot.api.dgdshape import as_services_shape, components_path, is_components_shape
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
    # Legacy; ignored for DGD-managed automatic checkpoints; Manual mode finds a checkpoint by its hash.
    # Kept loose so partial identities stored before the CRD typed it still decode.
    identity: JSONObject | None = None
    target_container_name: str = "main"
    # upstream's GMS checkpoint Job customisation: refused by name when set
    job: JSONObject | None = None


class GPUMemoryService(Base):
    enabled: bool = False


class Failover(Base):
    enabled: bool = False


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
    gpu_memory_service: GPUMemoryService | None = None
    failover: Failover | None = None

    def __post_init__(self) -> None:
        check_shape(self.extra_pod_spec, PodSpecShape, "extraPodSpec")
        check_shape(self.extra_pod_metadata, MetadataShape, "extraPodMetadata")
        check_shape(self.resources, ResourcesShape, "resources")


_NOT_SUPPORTED = "is not supported by dynamo-snapshot"


def refuse_unsupported(component: str, service: Service, index: int | None = None) -> None:
    """Upstream features the schema accepts and this project does not run: refused by name when enabled.
    `index`: the component's place in a v1beta1 `spec.components` (the fields are named as written there,
    where the presence of `experimental.<feature>` is what enables it)."""
    at = f"spec.services.{component}" if index is None else f"spec.components[{index}].experimental"
    if service.gpu_memory_service is not None and service.gpu_memory_service.enabled:
        field = "gpuMemoryService.enabled" if index is None else "gpuMemoryService"
        fix = "set it to false or remove gpuMemoryService" if index is None else "remove it"
        raise InvalidObject(f"{at}.{field}", f"GPU Memory Service {_NOT_SUPPORTED} (component {component}); {fix}")
    if service.failover is not None and service.failover.enabled:
        field = "failover.enabled" if index is None else "failover"
        fix = "set it to false or remove failover" if index is None else "remove it"
        raise InvalidObject(f"{at}.{field}", f"failover restore {_NOT_SUPPORTED} (component {component}); {fix}")
    if service.checkpoint is not None and service.checkpoint.enabled and service.checkpoint.job:
        raise InvalidObject(f"{at}.checkpoint.job", f"GMS + Snapshot (the checkpoint Job's gmsClientContainers "
                            f"and podTemplate) {_NOT_SUPPORTED} (component {component}); remove checkpoint.job")


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


class _Shape(msgspec.Struct):
    spec: Any = None


_SHAPE_DECODER = msgspec.json.Decoder(_Shape)
V1BETA1_API_VERSION = f"{names.GROUP}/{names.DGD_VERSION_V1BETA1}"


def _is_v1beta1(raw: bytes) -> bool:
    return is_components_shape(_SHAPE_DECODER.decode(raw).spec)


def _decode_v1beta1(raw: bytes) -> DynamoGraphDeployment:
    """A `spec.components` DGD as the `spec.services` one it means; errors name the component's path."""
    obj = msgspec.json.decode(raw)
    try:
        services = as_services_shape(obj)
        dgd = convert(services, DynamoGraphDeployment)
    except InvalidObject as err:
        listed = obj["spec"]["components"]
        names_ = [c.get("name") if isinstance(c, dict) else None for c in listed] if isinstance(listed, list) else []
        raise Refused(InvalidObject(components_path(err.path, names_), err.problem)) from None
    dgd.__dict__["_stored_spec"] = msgspec.convert(services, _Stored).spec
    dgd.api_version = V1BETA1_API_VERSION
    return dgd


def decode_dgd(raw: bytes) -> DynamoGraphDeployment:
    """A DGD from its JSON as the API server sent it, with `stored_spec` set and `api_version` the version
    whose shape its spec is in (the endpoint its writes go through: the other version's schema refuses
    it). Raises msgspec.ValidationError for one that does not fit, `api.Refused` for one that uses what
    this project does not run (the DGD informer's `on_mismatch` turns either into an `api.Malformed`)."""
    if _is_v1beta1(raw):
        dgd = _decode_v1beta1(raw)
    else:
        dgd = _DGD_DECODER.decode(raw)
        dgd.__dict__["_stored_spec"] = _STORED_DECODER.decode(raw).spec
        dgd.api_version = names.API_VERSION
    beta = dgd.api_version == V1BETA1_API_VERSION
    for index, (component, service) in enumerate(dgd.spec.services.items()):
        try:
            refuse_unsupported(component, service, index if beta else None)
        except InvalidObject as err:
            raise Refused(err) from None
    return dgd


def malformed_dgd(raw: bytes, err: msgspec.ValidationError) -> Malformed | None:
    """The DGD informer's `on_mismatch`: `api.malformed_of`'s stand-in, its `api_version` the version whose
    shape the stored spec is in (the endpoint its status is written through)."""
    stand_in = malformed_of(DynamoGraphDeployment)(raw, err)
    if stand_in is not None:
        try:
            beta = _is_v1beta1(raw)
        except msgspec.ValidationError:
            beta = False
        stand_in.api_version = V1BETA1_API_VERSION if beta else names.API_VERSION
    return stand_in
