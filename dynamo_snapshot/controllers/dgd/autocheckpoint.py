"""DGD-managed automatic checkpoints: one DynamoCheckpoint per (DGD, component, worker generation)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from dynamo_snapshot.api import DeletionPolicy, DynamoCheckpoint, DynamoGraphDeployment, names
from dynamo_snapshot.controllers.checkpoint.cleanup import CLEANUP_FINALIZER
from dynamo_snapshot.controllers.dgd.workload import MAIN_CONTAINER, dgd_owner_reference
from dynamo_snapshot.hashing import dgd_checkpoint_id


@dataclass(frozen=True)
class Generation:
    """One worker generation of one component: what its automatic checkpoint is derived from."""

    namespace: str
    dgd_name: str
    dgd_uid: str
    component: str
    worker_hash: str

    @property
    def checkpoint_id(self) -> str:
        return dgd_checkpoint_id(self.namespace, self.dgd_name, self.dgd_uid, self.component, self.worker_hash)

    @property
    def checkpoint_name(self) -> str:
        return f"checkpoint-{self.checkpoint_id}"


class AutoCheckpointMismatch(ValueError):
    pass


def _recorded_inputs(gen: Generation) -> dict[str, dict[str, str]]:
    return {
        "labels": {
            names.LABEL_CHECKPOINT_ID: gen.checkpoint_id,
            names.LABEL_DGD_NAME: gen.dgd_name,
            names.LABEL_COMPONENT: gen.component,
            names.LABEL_WORKER_HASH: gen.worker_hash,
        },
        "extraParameters": {"dgdUID": gen.dgd_uid, "component": gen.component, "checkpointID": gen.checkpoint_id},
    }


def checkpoint_only_target(template: dict[str, Any], target: str = MAIN_CONTAINER) -> dict[str, Any]:
    """The component's pod with only the target container (sidecars are not part of the checkpoint) and
    without the generation's labels: the checkpoint pod is not a replica, and selectors that find the
    component's pods (Services, the ReplicaSet) must not find it."""
    shaped = copy.deepcopy(template)
    spec = shaped.setdefault("spec", {})
    spec["containers"] = [c for c in spec.get("containers", []) if c.get("name") == target]
    labels = shaped.get("metadata", {}).get("labels", {})
    for label in (names.LABEL_DGD_NAME, names.LABEL_COMPONENT, names.LABEL_WORKER_HASH):
        labels.pop(label, None)
    return shaped


def build_auto_checkpoint(
    dgd: DynamoGraphDeployment, gen: Generation, template: dict[str, Any], policy: DeletionPolicy,
    target: str = MAIN_CONTAINER,
) -> dict[str, Any]:
    recorded = _recorded_inputs(gen)
    metadata: dict[str, Any] = {
        "name": gen.checkpoint_name,
        "namespace": gen.namespace,
        "labels": recorded["labels"],
        "annotations": {
            names.ANN_AUTO_CHECKPOINT: "true",
            names.ANN_DELETION_POLICY: policy.value,
            names.ANN_ARTIFACT_VERSION: names.DEFAULT_ARTIFACT_VERSION,
        },
        "finalizers": [CLEANUP_FINALIZER],
    }
    if policy is DeletionPolicy.DELETE:
        metadata["ownerReferences"] = [dgd_owner_reference(dgd)]
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.CHECKPOINT_KIND,
        "metadata": metadata,
        "spec": {
            # Synthesized only because the v1alpha1 schema requires an identity; it never decides the ID.
            "identity": {
                "model": f"{gen.namespace}/{gen.dgd_name}",
                "backendFramework": dgd.spec.backend_framework,
                "extraParameters": recorded["extraParameters"],
            },
            "job": {"podTemplateSpec": checkpoint_only_target(template, target), "targetContainerName": target},
        },
    }


def check_adoptable(existing: DynamoCheckpoint, gen: Generation) -> None:
    """An existing `checkpoint-<id>` is ours only if every recorded input matches; anything else is a
    checkpoint of something else that happens to carry the name, and restoring from it would be wrong."""
    recorded = _recorded_inputs(gen)
    problems = []
    if existing.metadata.annotations.get(names.ANN_AUTO_CHECKPOINT) != "true":
        problems.append(f"annotation {names.ANN_AUTO_CHECKPOINT} is not \"true\"")
    for key, want in recorded["labels"].items():
        have = existing.metadata.labels.get(key)
        if have != want:
            problems.append(f"label {key}={have!r}, expected {want!r}")
    extra = existing.spec.identity.extra_parameters
    for key, want in recorded["extraParameters"].items():
        if extra.get(key) != want:
            problems.append(f"identity.extraParameters.{key}={extra.get(key)!r}, expected {want!r}")
    if problems:
        raise AutoCheckpointMismatch(
            f"automatic checkpoint mismatch: {existing.metadata.namespace}/{existing.metadata.name} exists but "
            + "; ".join(problems)
        )
