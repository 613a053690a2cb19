"""Generated malformed DynamoCheckpoints and DGDs: a valid object with one to three fields the operator
reads replaced by a value of another type or shape (seeded, so a failure reproduces)."""

from __future__ import annotations

import copy
import random
from typing import Any

from tests.controllers.support import checkpoint_manifest

CHECKPOINT_PATHS = [
    "spec", "spec.identity", "spec.identity.model", "spec.identity.backendFramework",
    "spec.identity.extraParameters", "spec.identity.tensorParallelSize", "spec.job", "spec.job.podTemplateSpec",
    "spec.job.podTemplateSpec.metadata", "spec.job.podTemplateSpec.metadata.labels",
    "spec.job.podTemplateSpec.spec", "spec.job.podTemplateSpec.spec.containers",
    "spec.job.podTemplateSpec.spec.containers.0", "spec.job.podTemplateSpec.spec.containers.0.name",
    "spec.job.podTemplateSpec.spec.containers.0.env", "spec.job.podTemplateSpec.spec.containers.0.env.0",
    "spec.job.podTemplateSpec.spec.containers.0.env.0.value", "spec.job.podTemplateSpec.spec.containers.0.command",
    "spec.job.podTemplateSpec.spec.containers.0.args", "spec.job.podTemplateSpec.spec.containers.0.volumeMounts",
    "spec.job.podTemplateSpec.spec.containers.0.resources", "spec.job.podTemplateSpec.spec.volumes",
    "spec.job.targetContainerName", "spec.job.activeDeadlineSeconds", "spec.job.sharedMemory",
    "spec.job.backoffLimit", "spec.job.podTemplateSpec.spec.containers.0.resources.limits.cpu",
]
_SERVICE = "spec.services.Worker"
DGD_PATHS = [
    "spec", "spec.backendFramework", "spec.envs", "spec.envs.0", "spec.envs.0.value", "spec.services",
    _SERVICE, f"{_SERVICE}.replicas", f"{_SERVICE}.envs", f"{_SERVICE}.resources",
    f"{_SERVICE}.resources.limits", f"{_SERVICE}.extraPodMetadata", f"{_SERVICE}.extraPodMetadata.labels",
    f"{_SERVICE}.extraPodSpec", f"{_SERVICE}.extraPodSpec.mainContainer",
    f"{_SERVICE}.extraPodSpec.mainContainer.env", f"{_SERVICE}.extraPodSpec.mainContainer.args",
    f"{_SERVICE}.extraPodSpec.mainContainer.name", f"{_SERVICE}.extraPodSpec.mainContainer.volumeMounts",
    f"{_SERVICE}.extraPodSpec.containers", f"{_SERVICE}.checkpoint", f"{_SERVICE}.checkpoint.enabled",
    f"{_SERVICE}.checkpoint.checkpointRef", f"{_SERVICE}.checkpoint.identity", f"{_SERVICE}.componentType",
    # quantities: the schema keeps these open (a stored object may hold anything there), the operator does not
    f"{_SERVICE}.resources.limits.cpu", f"{_SERVICE}.extraPodSpec.mainContainer.resources.limits.cpu",
]


QUANTITY = {"DynamoCheckpoint": "spec.job.podTemplateSpec.spec.containers.0.resources.limits.cpu",
            "DynamoGraphDeployment": f"{_SERVICE}.resources.limits.cpu"}


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": [value]}
    return value


VALUES: list[Any] = [
    "x", "", "main", 0, -1, 2**40, 1.5, True, False, None, [], ["a"], [1], [[]], {}, {"a": 1}, {"name": 1},
    [{"name": "A", "value": 1}], [{"value": "no name"}], [{"name": "A", "valueFrom": "x"}], ["main", 3],
    {"containers": "x"}, {"mainContainer": []}, {"env": {"A": "1"}}, _deep(40), "é" * 300,
]


def _child(node: Any, part: str) -> tuple[Any, bool]:
    if isinstance(node, list):
        index = int(part) if part.isdigit() else len(node)
        return (node[index], True) if index < len(node) else (None, False)
    return (node.get(part), True) if isinstance(node, dict) else (None, False)


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` (dots; digits index lists) when its parent still exists: an earlier change may have
    replaced one, and then this change has nothing to change."""
    *parents, last = path.split(".")
    node: Any = obj
    for part in parents:
        node, found = _child(node, part)
        if not found or not isinstance(node, dict | list):
            return
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value


def base_checkpoint(name: str) -> dict[str, Any]:
    containers = [{"name": "main", "image": "placeholder:1", "command": ["sleep", "1"], "args": ["x"],
                   "env": [{"name": "A", "value": "1"}], "volumeMounts": [{"name": "v", "mountPath": "/v"}],
                   "resources": {"limits": {"cpu": "1"}}}]
    obj = checkpoint_manifest(name, containers=containers, activeDeadlineSeconds=60)
    obj["spec"]["job"]["podTemplateSpec"]["metadata"] = {"labels": {"app": "x"}}
    obj["spec"]["job"]["podTemplateSpec"]["spec"]["volumes"] = [{"name": "v", "emptyDir": {}}]
    obj["spec"]["identity"]["extraParameters"] = {"k": "v"}
    return obj


def base_dgd(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment", "metadata": {"name": name},
        "spec": {"backendFramework": "vllm", "envs": [{"name": "G", "value": "1"}], "services": {"Worker": {
            "componentType": "worker", "replicas": 0, "envs": [{"name": "S", "value": "1"}],
            "resources": {"limits": {"cpu": "1"}}, "extraPodMetadata": {"labels": {"app": "x"}},
            "extraPodSpec": {"mainContainer": {"image": "placeholder:1", "args": ["x"],
                                               "env": [{"name": "A", "value": "1"}]}},
            "checkpoint": {"enabled": False}}}},
    }


def malformed(kind: str, name: str, rng: random.Random) -> dict[str, Any]:
    obj = copy.deepcopy(base_checkpoint(name) if kind == "DynamoCheckpoint" else base_dgd(name))
    paths = CHECKPOINT_PATHS if kind == "DynamoCheckpoint" else DGD_PATHS
    chosen = rng.sample(paths, rng.randint(1, 3))
    if rng.random() < 0.3:  # the quantities the schema leaves open: so that some objects reach the operator
        chosen.append(QUANTITY[kind])
    for path in chosen:
        _set(obj, path, copy.deepcopy(rng.choice(VALUES)))
    return obj


def generate(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    kinds = ["DynamoCheckpoint", "DynamoGraphDeployment"]
    return [malformed(kinds[i % 2], f"{'ckpt' if i % 2 == 0 else 'dgd'}-{i:04d}", rng) for i in range(count)]
