"""Resource types by (group, version, plural), and the objects' keys and metadata.

Objects are either plain dicts (as decoded from JSON) or msgspec structs with a `metadata` field
(the `dynamo_snapshot.api` types): the helpers here read both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from dynamo_snapshot.api import names

__all__ = [
    "CONFIGMAPS",
    "DYNAMO_CHECKPOINTS",
    "DYNAMO_GRAPH_DEPLOYMENTS",
    "EVENTS",
    "EVENTS_V1",
    "JOBS",
    "LEASES",
    "NAMESPACES",
    "NODES",
    "PERSISTENT_VOLUME_CLAIMS",
    "PODS",
    "SECRETS",
    "SERVICES",
    "ObjectKey",
    "Resource",
    "labels_of",
    "meta",
    "object_key",
    "owner_references",
    "resource_version",
    "store_key",
]


class Resource(NamedTuple):
    """One resource type of the API: `Resource("batch", "v1", "jobs", "Job")`; group "" is the core group."""

    group: str
    version: str
    plural: str
    kind: str = ""
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def at_version(self, api_version: str) -> Resource:
        """This resource through the endpoint of another version it is served at (`api_version` as in an
        object's `apiVersion`: `nvidia.com/v1beta1`)."""
        group, _, version = api_version.rpartition("/")
        if group != self.group or not version:
            raise ValueError(f"{api_version} is not a version of {self}")
        return self._replace(version=version)

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL path: `/api/v1/namespaces/ns/pods/name/status` and the like."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace and self.namespaced:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


PODS = Resource("", "v1", "pods", "Pod")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
SECRETS = Resource("", "v1", "secrets", "Secret")
SERVICES = Resource("", "v1", "services", "Service")
PERSISTENT_VOLUME_CLAIMS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
EVENTS = Resource("", "v1", "events", "Event")
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
EVENTS_V1 = Resource("events.k8s.io", "v1", "events", "Event")
JOBS = Resource("batch", "v1", "jobs", "Job")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
DYNAMO_CHECKPOINTS = Resource(names.GROUP, names.VERSION, names.CHECKPOINT_PLURAL, names.CHECKPOINT_KIND)
DYNAMO_GRAPH_DEPLOYMENTS = Resource(names.GROUP, names.VERSION, names.DGD_PLURAL, names.DGD_KIND)


class ObjectKey(NamedTuple):
    """What a controller reconciles: namespace ("" for cluster-scoped objects) and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @classmethod
    def parse(cls, key: str) -> ObjectKey:
        namespace, _, name = key.rpartition("/")
        return cls(namespace, name)


# -- reading metadata of dicts and structs -------------------------------------------------------------
def meta(obj: Any) -> Any:
    """The metadata of a dict or a struct (a dict or an ObjectMeta-like struct)."""
    return (obj.get("metadata") or {}) if isinstance(obj, dict) else obj.metadata


def _field(metadata: Any, wire: str, attr: str, default: Any) -> Any:
    if isinstance(metadata, dict):
        return metadata.get(wire) or default
    return getattr(metadata, attr, None) or default


def object_key(obj: Any) -> ObjectKey:
    m = meta(obj)
    return ObjectKey(_field(m, "namespace", "namespace", ""), _field(m, "name", "name", ""))


def store_key(obj: Any) -> str:
    """client-go's MetaNamespaceKeyFunc: `namespace/name`, or `name` for cluster-scoped objects."""
    m = meta(obj)
    if isinstance(m, dict):
        namespace, name = m.get("namespace"), m.get("name", "")
    else:
        namespace, name = m.namespace, m.name
    return f"{namespace}/{name}" if namespace else name


def resource_version(obj: Any) -> str:
    return _field(meta(obj), "resourceVersion", "resource_version", "")


def labels_of(obj: Any) -> dict[str, str]:
    return _field(meta(obj), "labels", "labels", {})


def owner_references(obj: Any) -> list[Any]:
    """The ownerReferences as plain dicts (apiVersion, kind, name, uid, controller)."""
    refs = _field(meta(obj), "ownerReferences", "owner_references", [])
    return [ref if isinstance(ref, dict) else
            {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name, "uid": ref.uid,
             "controller": ref.controller} for ref in refs]
