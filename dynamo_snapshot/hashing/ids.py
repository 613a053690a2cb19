"""The identifiers of SPEC section 3: legacy identity hash, DGD checkpoint ID, worker hash."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from dynamo_snapshot.api import names
from dynamo_snapshot.hashing.gojson import GoStruct, marshal

__all__ = ["derived_dgd_checkpoint_id", "dgd_checkpoint_id", "identity_hash", "identity_hash_input", "worker_hash",
           "worker_hash_input"]

WORKER_HASH_VERSION = "worker-v1"


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_crd_dict(identity: Any) -> Mapping[str, Any]:
    """Accept the api struct or a plain dict in CRD shape (camelCase keys)."""
    if isinstance(identity, Mapping):
        return identity
    if isinstance(identity, msgspec.Struct):
        return msgspec.to_builtins(identity)
    raise TypeError(f"identity must be a mapping or an api struct, got {type(identity).__name__}")


def identity_hash_input(identity: Any) -> bytes:
    """The canonical bytes the legacy identity hash is taken over."""
    ident = _as_crd_dict(identity)
    fields: list[tuple[str, Any]] = [
        ("model", ident.get("model") or ""),
        ("backendFramework", ident.get("backendFramework") or ""),
    ]
    if ident.get("dynamoVersion"):
        fields.append(("dynamoVersion", ident["dynamoVersion"]))
    # Go's operator treats an unset (0) parallel size as 1, so both spellings hash alike.
    fields.append(("tensorParallelSize", int(ident.get("tensorParallelSize") or 1)))
    fields.append(("pipelineParallelSize", int(ident.get("pipelineParallelSize") or 1)))
    if ident.get("dtype"):
        fields.append(("dtype", ident["dtype"]))
    if ident.get("maxModelLen"):
        fields.append(("maxModelLen", int(ident["maxModelLen"])))
    if ident.get("extraParameters"):
        fields.append(("extraParameters", dict(ident["extraParameters"])))
    return marshal(GoStruct(*fields))


def identity_hash(identity: Any) -> str:
    """Legacy 16-hex identity hash of a standalone DynamoCheckpoint's `spec.identity`."""
    return _sha256_hex(identity_hash_input(identity))[:16]


def dgd_checkpoint_id(namespace: str, dgd_name: str, dgd_uid: str, component: str, worker_hash: str) -> str:
    """32-hex ID of a DGD-managed automatic checkpoint: scoped to one DGD, component and worker generation."""
    fields: list[tuple[str, Any]] = []
    if namespace:
        fields.append(("namespace", namespace))
    fields.append(("dgdName", dgd_name))
    if dgd_uid:
        fields.append(("dgdUID", dgd_uid))
    fields.append(("componentName", component))
    if worker_hash:
        fields.append(("workerHash", worker_hash))
    return _sha256_hex(marshal(GoStruct(*fields)))[:32]


def derived_dgd_checkpoint_id(namespace: str, labels: Mapping[str, str], extra_parameters: Mapping[str, str]) -> str:
    """The ID an automatic checkpoint in ``namespace`` carrying these labels and identity extraParameters
    was made for (``dgd_checkpoint_id`` of its DGD's name and UID, component and worker hash); "" when one
    of them is missing. The namespace is in the hash, so no other namespace's object derives the same ID:
    what decides whether a checkpoint ID is this namespace's to delete from storage shared by all."""
    dgd_name, component = labels.get(names.LABEL_DGD_NAME, ""), labels.get(names.LABEL_COMPONENT, "")
    dgd_uid = extra_parameters.get("dgdUID", "")
    if not (namespace and dgd_name and component and dgd_uid):
        return ""
    return dgd_checkpoint_id(namespace, dgd_name, dgd_uid, component, labels.get(names.LABEL_WORKER_HASH, ""))


# Service fields that never change what runs in the container, so never change the worker hash.
_NON_WORKER_FIELDS = frozenset({"replicas", "checkpoint"})


def _drop_empty(value: Any) -> Any:
    """Absent, null, "" and empty lists/maps mean the same thing in a Kubernetes object; normalise them
    away (recursively, map values only) so that `envs: []` and no `envs` hash alike. 0 and false are kept:
    `runAsUser: 0` is not the same as no runAsUser."""
    if isinstance(value, Mapping):
        cleaned = {}
        for key, item in value.items():
            item = _drop_empty(item)
            if item is None or item == "" or (isinstance(item, Mapping | list) and not item):
                continue
            cleaned[key] = item
        return cleaned
    if isinstance(value, list | tuple):
        return [_drop_empty(item) for item in value]
    return value


def _service_dict(service: Any) -> dict[str, Any]:
    raw = msgspec.to_builtins(service) if isinstance(service, msgspec.Struct) else dict(service or {})
    return {k: v for k, v in raw.items() if k not in _NON_WORKER_FIELDS}


def worker_hash_input(component: str, service: Any, graph_envs: Sequence[Any] | None) -> bytes:
    return marshal(
        GoStruct(
            ("version", WORKER_HASH_VERSION),
            ("component", component),
            ("service", _drop_empty(_service_dict(service))),
            ("graphEnvs", _drop_empty(list(graph_envs or []))),
        )
    )


def worker_hash(component: str, service: Any, graph_envs: Sequence[Any] | None) -> str:
    """8-hex hash of everything that decides what runs in a component's container (docs/identifiers.md)."""
    return _sha256_hex(worker_hash_input(component, service, graph_envs))[:8]
