"""The two shapes of a DynamoGraphDeployment spec, made one.

Upstream serves `nvidia.com/v1alpha1` (`spec.services`, a map) and `nvidia.com/v1beta1` (`spec.components`,
a list, each with a `podTemplate` and an `experimental` block). This project serves both without a
conversion webhook (docs/compatibility.md): an object is stored in the shape it was written in, and the
operator reads either through `as_services_shape`.

Stages: tell the shape (services, components, or both: refused by name); map each component onto the
service it means in v1alpha1 (upstream's conversion: `type` -> `componentType`, the `main` container of
`podTemplate` -> `extraPodSpec.mainContainer`, its metadata -> `extraPodMetadata`, `env` -> `envs`, the
presence of `experimental.checkpoint` / `gpuMemoryService` / `failover` -> `enabled: true`).
`is_components_shape` says which version an object is in (the API server's stamp does not, see there);
`components_path` names an error found in the services shape where the user wrote it.
Pure: plain dicts in, plain dicts out; the input is not modified.
"""

from __future__ import annotations

import copy
from typing import Any

from dynamo_snapshot.api.decode import InvalidObject

MAIN_CONTAINER = "main"
# v1beta1 spells the GMS/failover modes IntraPod/InterPod; v1alpha1 intraPod/interPod
_MODES = {"IntraPod": "intraPod", "InterPod": "interPod"}


def _pod_fields(template: Any, at: str) -> dict[str, Any]:
    """`podTemplate` as v1alpha1's `extraPodSpec` (with `mainContainer`) and `extraPodMetadata`."""
    if template is None:
        return {}
    if not isinstance(template, dict):
        raise InvalidObject(f"{at}.podTemplate", "expected an object (a PodTemplateSpec)")
    out: dict[str, Any] = {}
    spec = copy.deepcopy(template.get("spec") or {})
    containers = spec.get("containers") or []
    if not isinstance(spec, dict) or not isinstance(containers, list):
        raise InvalidObject(f"{at}.podTemplate.spec.containers", "expected a list of containers")
    main = next((c for c in containers if isinstance(c, dict) and c.get("name") == MAIN_CONTAINER), None)
    if main is not None:
        spec["mainContainer"] = main
        spec["containers"] = [c for c in containers if c is not main]
        if not spec["containers"]:
            del spec["containers"]
    if spec:
        out["extraPodSpec"] = spec
    meta = template.get("metadata") or {}
    if isinstance(meta, dict):
        picked = {k: meta[k] for k in ("labels", "annotations") if meta.get(k)}
        if picked:
            out["extraPodMetadata"] = copy.deepcopy(picked)
    return out


def _experimental(block: Any, at: str) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise InvalidObject(f"{at}.experimental", "expected an object")
    out: dict[str, Any] = {}
    for key in ("checkpoint", "gpuMemoryService", "failover"):
        value = block.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise InvalidObject(f"{at}.experimental.{key}", "expected an object")
        value = {**copy.deepcopy(value), "enabled": True}
        if "mode" in value and key != "checkpoint":
            value["mode"] = _MODES.get(value["mode"], value["mode"])
        out[key] = value
    return out


_RENAMED = {"name", "type", "podTemplate", "experimental", "sharedMemorySize"}


def _service_of(component: dict[str, Any], at: str) -> dict[str, Any]:
    service = {k: copy.deepcopy(v) for k, v in component.items() if k not in _RENAMED}
    if component.get("type") is not None:
        service["componentType"] = component["type"]
    if component.get("sharedMemorySize") is not None:
        service["sharedMemory"] = {"size": component["sharedMemorySize"]}
    service.update(_pod_fields(component.get("podTemplate"), at))
    service.update(_experimental(component.get("experimental"), at))
    return service


def _services_of(components: Any) -> dict[str, Any]:
    if not isinstance(components, list):
        raise InvalidObject("spec.components", "expected a list of components")
    services: dict[str, Any] = {}
    for i, component in enumerate(components):
        at = f"spec.components[{i}]"
        if not isinstance(component, dict) or not isinstance(component.get("name"), str) or not component["name"]:
            raise InvalidObject(f"{at}.name", "required: every component needs a name")
        if component["name"] in services:
            raise InvalidObject(f"{at}.name", f"component {component['name']} is listed twice")
        services[component["name"]] = _service_of(component, at)
    return services


def as_services_shape(obj: dict[str, Any]) -> dict[str, Any]:
    """The DGD `obj` with its spec in the `spec.services` shape (the object itself when it already is)."""
    spec = obj.get("spec")
    if not isinstance(spec, dict) or "components" not in spec:
        return obj
    if "services" in spec:
        raise InvalidObject("spec.components", "spec.services (nvidia.com/v1alpha1) and spec.components "
                            "(nvidia.com/v1beta1) are both set: keep one")
    new_spec = {k: v for k, v in spec.items() if k not in ("components", "env")}
    new_spec["services"] = _services_of(spec["components"])
    if spec.get("env") is not None:
        new_spec["envs"] = spec["env"]
    return {**obj, "spec": new_spec}


def is_components_shape(spec: Any) -> bool:
    """Whether `spec` is in the v1beta1 shape (`spec.components`). With conversion strategy None the API
    server stamps every object with the version it was read through, so the shape is the only trace of the
    version an object was written in: each version's CRD schema refuses the other's shape."""
    return isinstance(spec, dict) and "components" in spec


def components_path(path: str, components: list[str]) -> str:
    """A path into the services shape (`spec.services[Worker].replicas`) as a path into the components
    list it came from (`spec.components[1].replicas`); the part past the component is left in v1alpha1
    terms. Paths outside `spec.services` are returned unchanged."""
    for prefix in ("spec.services[", "spec.services."):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        for index, name in enumerate(components):
            end = name + "]" if prefix.endswith("[") else name
            if rest == end or rest.startswith(end + ".") or rest.startswith(end + "["):
                return f"spec.components[{index}]{rest[len(end):]}"
    return path
