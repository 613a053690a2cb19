"""Small pieces every controller of the operator uses: extra resource types, conditions, clock."""

from __future__ import annotations

import datetime as dt
from typing import Any

from dynamo_snapshot.kube import Resource

DAEMONSETS = Resource("apps", "v1", "daemonsets", "DaemonSet")
REPLICASETS = Resource("apps", "v1", "replicasets", "ReplicaSet")

FIELD_MANAGER = "dynamo-snapshot-operator"
EVENT_CONTROLLER = "nvidia.com/dynamo-snapshot-operator"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def with_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """`conditions` with `type_` set; lastTransitionTime moves only when the status flips."""
    wanted = "True" if status else "False"
    result = []
    previous = None
    for condition in conditions or []:
        if condition.get("type") == type_:
            previous = condition
        else:
            result.append(condition)
    changed = previous is None or previous.get("status") != wanted
    result.append({
        "type": type_,
        "status": wanted,
        "reason": reason,
        "message": message,
        "lastTransitionTime": timestamp(now) if changed else previous.get("lastTransitionTime") or timestamp(now),
        "observedGeneration": generation,
    })
    return result


def controller_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """An ownerReference that makes the owner the object's controller (garbage collected with it)."""
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def is_deleting(obj: dict[str, Any] | None) -> bool:
    return bool(obj and metadata(obj).get("deletionTimestamp"))


def owned_by(obj: dict[str, Any], owner_uid: str) -> bool:
    return any(ref.get("uid") == owner_uid for ref in metadata(obj).get("ownerReferences") or [])
