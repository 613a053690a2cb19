"""The PVC controller's rules (SPEC section 6, podMount): each namespace that checkpoints or restores has
the configured PVC - created by the operator when `create: true`, else verified."""

from __future__ import annotations

from typing import Any

from dynamo_snapshot.api import OperatorConfig, names


def build_storage_pvc(namespace: str, config: OperatorConfig) -> dict[str, Any]:
    pvc = config.checkpoint.storage.pvc
    spec: dict[str, Any] = {
        "accessModes": [pvc.access_mode],
        "resources": {"requests": {"storage": pvc.size}},
    }
    if pvc.storage_class_name:
        spec["storageClassName"] = pvc.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": pvc.pvc_name,
            "namespace": namespace,
            "labels": {names.LABEL_APP_COMPONENT: names.STORAGE_COMPONENT},
        },
        "spec": spec,
    }
