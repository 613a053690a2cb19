"""Resource paths and object keys (kube/resources.py), and the managed-fields transform of dict caches."""

from __future__ import annotations

from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    NODES,
    PODS,
    ObjectKey,
    strip_managed_fields,
)


def test_resource_paths_and_keys():
    assert PODS.path("ns", "p", "status") == "/api/v1/namespaces/ns/pods/p/status"
    assert PODS.path() == "/api/v1/pods"  # every namespace
    assert NODES.path("ignored", "n1") == "/api/v1/nodes/n1"
    assert DYNAMO_CHECKPOINTS.path("ns") == "/apis/nvidia.com/v1alpha1/namespaces/ns/dynamocheckpoints"
    assert DYNAMO_CHECKPOINTS.api_version == "nvidia.com/v1alpha1"
    assert str(ObjectKey("ns", "a")) == "ns/a" and ObjectKey.parse("ns/a") == ObjectKey("ns", "a")
    assert ObjectKey.parse("node-1") == ObjectKey("", "node-1")


def test_managed_fields_are_stripped():
    obj = {"metadata": {"name": "a", "managedFields": [{"manager": "x"}]}}
    assert strip_managed_fields(obj) == {"metadata": {"name": "a"}}
