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
    """Fields not named here are ignored (and kept in the plain JSON the struct was checked from)."""


class EnvShape(_Shape):
    name: str
    value: str | None = None
    value_from: dict[str, Any] | None = None


class MountShape(_Shape):
    name: str
    mount_path: str


Quantity = str | int | float


class ResourcesShape(_Shape):
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


class ContainerShape(_Shape):
    name: str = ""
    image: str = ""
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvShape] | None = None
    volume_mounts: list[MountShape] | None = None
    resources: ResourcesShape | None = None
    startup_probe: dict[str, Any] | None = None
    readiness_probe: dict[str, Any] | None = None


class VolumeShape(_Shape):
    name: str


class MetadataShape(_Shape):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class PodSpecShape(_Shape):
    containers: list[ContainerShape] | None = None
    init_containers: list[ContainerShape] | None = None
    volumes: list[VolumeShape] | None = None
    # a DGD's extraPodSpec: the main container, merged into containers[0]
    main_container: ContainerShape | None = None


class PodTemplateShape(_Shape):
    metadata: MetadataShape | None = None
    spec: PodSpecShape | None = None


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
