"""Small pieces every controller of the operator uses: extra resource types, conditions, clock."""

from __future__ import annotations

import datetime as dt
from typing import Any

from dynamo_snapshot.api import Condition, find_condition
from dynamo_snapshot.kube import Resource
from dynamo_snapshot.kube.resources import meta, owner_references

DAEMONSETS = Resource("apps", "v1", "daemonsets", "DaemonSet")
REPLICASETS = Resource("apps", "v1", "replicasets", "ReplicaSet")

FIELD_MANAGER = "dynamo-snapshot-operator"
EVENT_CONTROLLER = "nvidia.com/dynamo-snapshot-operator"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def with_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    now: dt.datetime,
) -> list[Condition]:
    """`conditions` with `type_` set; lastTransitionTime moves only when the status flips."""
    wanted = "True" if status else "False"
    previous = find_condition(conditions, type_)
    changed = previous is None or previous.status != wanted
    return [*(c for c in conditions if c.type != type_), Condition(
        type=type_, status=wanted, reason=reason, message=message, observed_generation=generation,
        last_transition_time=timestamp(now) if changed else previous.last_transition_time or timestamp(now))]


def controller_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """An ownerReference that makes the owner the object's controller (garbage collected with it)."""
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(obj: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a plain-dict object (Jobs, Pods, ...); api structs have `.metadata`."""
    return meta(obj)


def is_deleting(obj: Any) -> bool:
    """Whether the object's deletion has begun: a plain dict, or an api struct (`Malformed` included)."""
    if not obj:
        return False
    m = meta(obj)
    return bool(m.get("deletionTimestamp") if isinstance(m, dict) else m.deletion_timestamp)


def owned_by(obj: Any, owner_uid: str) -> bool:
    return any(ref["uid"] == owner_uid for ref in owner_references(obj))
