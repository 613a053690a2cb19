"""API errors (kube/errors.py): status, reason and message kept, mapped to their classes."""

from __future__ import annotations

from dynamo_snapshot.kube import (
    AlreadyExists,
    Conflict,
    Expired,
    NotFound,
    ServerError,
    is_expired,
)
from dynamo_snapshot.kube.errors import api_error


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
