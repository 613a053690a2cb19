"""Shared Kubernetes shapes: object metadata and conditions."""

from __future__ import annotations

from typing import Any

import msgspec


class Base(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """Every api struct: camelCase wire names, defaults left out when encoding, unknown fields ignored
    (the API server adds many: managedFields and the like)."""


class OwnerReference(Base):
    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool | None = None
    block_owner_deletion: bool | None = None


class ObjectMeta(Base):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    owner_references: list[OwnerReference] = []
    finalizers: list[str] = []


class Condition(Base):
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int = 0


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


JSONObject = dict[str, Any]
