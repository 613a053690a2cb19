"""The parts of a PodTemplateSpec (and of a DGD's PodSpec fragment) the operator reads, as shapes.

The api structs keep pod templates as plain JSON (a Kubernetes PodSpec has hundreds of fields the
operator passes through untouched), so the types of the few fields it does read are checked here when
an object is decoded: `check_shape` raises a ValueError that msgspec turns into a ValidationError at the
right place, and `api.decode` joins the paths (`spec.job.podTemplateSpec.spec.containers[0].env`).
"""

from __future__ import annotations

from typing import Any

import msgspec


class _Shape(msgspec.Struct, rename="camel", kw_only=True):
    """Fields not named here are ignored (and kept in the plain JSON the struct was checked from). A field
    may be absent but not null: the planners read `spec.get("containers", [])` and the like."""


class EnvShape(_Shape):
    name: str
    value: str | None = None
    value_from: dict[str, Any] = {}


class MountShape(_Shape):
    name: str
    mount_path: str


Quantity = str | int | float


class ResourcesShape(_Shape):
    requests: dict[str, Quantity] = {}
    limits: dict[str, Quantity] = {}


class ContainerShape(_Shape):
    name: str = ""
    image: str = ""
    command: list[str] = []
    args: list[str] = []
    env: list[EnvShape] = []
    volume_mounts: list[MountShape] = []
    resources: ResourcesShape = msgspec.field(default_factory=ResourcesShape)
    startup_probe: dict[str, Any] = {}
    readiness_probe: dict[str, Any] = {}


class VolumeShape(_Shape):
    name: str


class MetadataShape(_Shape):
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class PodSpecShape(_Shape):
    containers: list[ContainerShape] = []
    init_containers: list[ContainerShape] = []
    volumes: list[VolumeShape] = []
    # a DGD's extraPodSpec: the main container, merged into containers[0]
    main_container: ContainerShape = msgspec.field(default_factory=ContainerShape)


class PodTemplateShape(_Shape):
    metadata: MetadataShape = msgspec.field(default_factory=MetadataShape)
    spec: PodSpecShape = msgspec.field(default_factory=PodSpecShape)


def check_shape(value: Any, shape: type, field: str) -> None:
    """Raise ValueError (msgspec's wording, with the path below `field`) if `value` does not fit `shape`."""
    if value is None:
        return
    try:
        msgspec.convert(value, shape)
    except msgspec.ValidationError as err:
        text = str(err)
        head, sep, tail = text.partition(" - at `$")
        raise ValueError(f"{head} - at `$.{field}{tail}" if sep else f"{text} - at `$.{field}`") from None


__all__ = [
    "ContainerShape", "EnvShape", "MetadataShape", "PodSpecShape", "PodTemplateShape", "ResourcesShape", "check_shape",
]
