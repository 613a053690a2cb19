"""Small pieces that need no cluster: backoff, error mapping, resource paths and keys."""

from __future__ import annotations

from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    NODES,
    PODS,
    AlreadyExists,
    Backoff,
    Conflict,
    Expired,
    NotFound,
    ObjectKey,
    ServerError,
    is_expired,
    strip_managed_fields,
)
from dynamo_snapshot.kube.errors import api_error
from tests.kube.support import FakeClock


def test_backoff_doubles_from_0_8_to_30_with_jitter_and_resets_after_two_quiet_minutes():
    clock = FakeClock()
    backoff = Backoff(clock=clock)
    delays = []
    for _ in range(10):
        delays.append(backoff.next_delay())
        clock.now += 1
    nominal = [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30, 30, 30]
    assert all(n <= d <= n * 1.25 for n, d in zip(nominal, delays, strict=True))
    clock.now += 121  # two healthy minutes
    assert backoff.next_delay() <= 0.8 * 1.25


def test_errors_keep_status_reason_message_and_map_to_classes():
    status = {"kind": "Status", "code": 404, "reason": "NotFound", "message": 'pods "x" not found',
              "details": {"name": "x", "kind": "pods"}}
    err = api_error(404, status, method="GET", path="/api/v1/namespaces/a/pods/x")
    assert isinstance(err, NotFound)
    assert (err.status, err.reason, err.message, err.details["name"]) == (404, "NotFound", 'pods "x" not found', "x")
    assert str(err) == 'GET /api/v1/namespaces/a/pods/x: 404 NotFound: pods "x" not found'
    assert isinstance(api_error(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}), AlreadyExists)
    assert isinstance(api_error(409, {"kind": "Status", "code": 409, "reason": "Conflict"}), Conflict)
    assert isinstance(api_error(503, b"<html>busy</html>"), ServerError)
    gone = api_error(410, {"kind": "Status", "code": 410, "reason": "Expired",
                           "message": "too old resource version: 1 (2)"})
    assert isinstance(gone, Expired) and is_expired(gone)
    assert is_expired(api_error(500, {"kind": "Status", "code": 500, "message": "too old resource version: 5"}))


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
