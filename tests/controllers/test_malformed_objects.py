"""Malformed DynamoCheckpoints and DGDs through the real API server and the operator: what the schema
refuses never gets stored; every stored object that does not fit the operator's types goes Failed (a DGD
`failed`) once, with a message naming the field, and the operator logs no traceback."""

from __future__ import annotations

import collections
import json

import anyio
import pytest

from dynamo_snapshot.api import DynamoCheckpoint, DynamoGraphDeployment, InvalidObject, convert
from dynamo_snapshot.kube import DYNAMO_CHECKPOINTS, DYNAMO_GRAPH_DEPLOYMENTS, Client, Invalid
from tests.controllers.malformed import generate
from tests.controllers.support import enabled_config, eventually

pytestmark = pytest.mark.integration

COUNT = 300
KINDS = {"DynamoCheckpoint": DynamoCheckpoint, "DynamoGraphDeployment": DynamoGraphDeployment}


def _problem(obj) -> InvalidObject | None:
    try:
        convert(obj, KINDS[obj["kind"]])
    except InvalidObject as err:
        return err
    return None


def _failure_message(obj) -> str | None:
    status = obj.get("status") or {}
    if obj["kind"] == "DynamoCheckpoint":
        return status.get("message") if status.get("phase") == "Failed" else None
    if status.get("state") != "failed":
        return None
    return next((c.get("message") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)


async def _create_all(kubeconfig, namespace: str, objects: list[dict]) -> int:
    """Create each object as a client would; returns how many the schema refused."""
    refused = 0
    async with Client.from_config(kubeconfig) as client:
        for obj in objects:
            resource = DYNAMO_CHECKPOINTS if obj["kind"] == "DynamoCheckpoint" else DYNAMO_GRAPH_DEPLOYMENTS
            try:
                await client.create(resource, obj, namespace)
            except Invalid:
                refused += 1
    return refused


def test_malformed_objects_are_failed_once_by_field_name_without_a_traceback(kubeconfig, kubectl, namespace,
                                                                            start_operator):
    refused = anyio.run(_create_all, kubeconfig, namespace, generate(COUNT, seed=2026))
    operator = start_operator(enabled_config())

    def stored():
        return json.loads(kubectl("get", "dynamocheckpoints,dynamographdeployments", "-n", namespace,
                                  "-o", "json"))["items"]

    invalid: dict[str, str] = {}
    waiting: list[str] = []

    def every_invalid_object_failed_by_name() -> bool:
        waiting.clear()
        for obj in stored():
            problem = _problem(obj)
            if problem is None:
                continue
            name = obj["metadata"]["name"]
            invalid[name] = problem.path
            message = _failure_message(obj)
            if message is None or problem.path not in message:
                waiting.append(f"{name}: {problem} (status: {obj.get('status')})")
        return not waiting

    try:
        eventually(every_invalid_object_failed_by_name, timeout=180, what="invalid objects failed by field name")
    except AssertionError as err:
        pytest.fail(f"{err}: {len(waiting)} left, e.g. {waiting[:3]}")
    accepted = len(stored())
    assert accepted + refused == COUNT
    assert refused and invalid  # the schema refused some, the operator had to answer others

    log = operator.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert '"level": "error"' not in log
    said = collections.Counter(json.loads(line)["name"] for line in log.splitlines()
                               if '"is invalid"' in line or "is invalid\"" in line)
    assert set(said) == set(invalid), "each invalid object is reported by the operator"
    assert max(said.values()) == 1, f"reported more than once: {[n for n, c in said.items() if c > 1][:5]}"
