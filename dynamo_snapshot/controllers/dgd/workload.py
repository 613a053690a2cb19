"""A DGD service as pods: the pod template and the ReplicaSet of one worker generation."""

from __future__ import annotations

import copy
from typing import Any

from dynamo_snapshot.api import DynamoGraphDeployment, EnvVar, Service, names, to_dict
from dynamo_snapshot.controllers.common import controller_reference

MAIN_CONTAINER = "main"
# DGD resource names that are shorthands for Kubernetes resource names.
RESOURCE_ALIASES = {"gpu": "nvidia.com/gpu"}
DEFAULT_SHARED_MEMORY = "8Gi"


def _resources(resources: dict[str, Any] | None) -> dict[str, Any]:
    shaped: dict[str, Any] = {}
    for section in ("requests", "limits"):
        values = (resources or {}).get(section) or {}
        if values:
            shaped[section] = {RESOURCE_ALIASES.get(k, k): str(v) for k, v in values.items()}
    return shaped


def _env(env: list[EnvVar]) -> list[dict[str, Any]]:
    return [to_dict(e) for e in env]


def _merge_env(*layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Later layers win by name, keeping the first position of each name."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for entry in layer:
            merged[entry["name"]] = entry
    return list(merged.values())


def generation_labels(dgd_name: str, component: str, worker_hash: str) -> dict[str, str]:
    return {names.LABEL_DGD_NAME: dgd_name, names.LABEL_COMPONENT: component, names.LABEL_WORKER_HASH: worker_hash}


def pod_template(dgd: DynamoGraphDeployment, component: str, service: Service, worker_hash: str) -> dict[str, Any]:
    """The component's pod: `extraPodSpec` with its `mainContainer` as container `main`, graph and service
    env, the service's resources, `extraPodMetadata`, and the generation's labels."""
    spec = copy.deepcopy(service.extra_pod_spec or {})
    main = spec.pop("mainContainer", None) or {}
    main = {**main, "name": main.get("name") or MAIN_CONTAINER}
    main["env"] = _merge_env(_env(dgd.spec.envs), _env(service.envs), main.get("env") or [])
    resources = _resources(service.resources)
    if resources:
        main["resources"] = {**(main.get("resources") or {}), **resources}
    others = [c for c in spec.get("containers", []) if c.get("name") != main["name"]]
    spec["containers"] = [main, *others]
    extra_meta = service.extra_pod_metadata or {}
    labels = {**(extra_meta.get("labels") or {}), **generation_labels(dgd.metadata.name, component, worker_hash)}
    metadata: dict[str, Any] = {"labels": labels}
    if extra_meta.get("annotations"):
        metadata["annotations"] = dict(extra_meta["annotations"])
    return {"metadata": metadata, "spec": spec}


def replicaset_name(dgd_name: str, component: str, worker_hash: str) -> str:
    return f"{dgd_name}-{component}-{worker_hash}".lower()


def dgd_owner_reference(dgd: DynamoGraphDeployment) -> dict[str, Any]:
    return controller_reference(names.API_VERSION, names.DGD_KIND, dgd.metadata.name, dgd.metadata.uid)


def replicaset(
    dgd: DynamoGraphDeployment, component: str, worker_hash: str, template: dict[str, Any], replicas: int
) -> dict[str, Any]:
    selector = generation_labels(dgd.metadata.name, component, worker_hash)
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": replicaset_name(dgd.metadata.name, component, worker_hash),
            "namespace": dgd.metadata.namespace,
            "labels": dict(selector),
            "ownerReferences": [dgd_owner_reference(dgd)],
        },
        "spec": {"replicas": replicas, "selector": {"matchLabels": selector}, "template": template},
    }
