"""The API client against the real API server: every verb, every patch type, the status subresource,
typed decoding, pagination, watch, events, and errors that keep the server's status, reason and message."""

from __future__ import annotations

import pytest

from dynamo_snapshot.api import DynamoCheckpoint, Phase
from dynamo_snapshot.kube import (
    CONFIGMAPS,
    DYNAMO_CHECKPOINTS,
    EVENTS,
    EVENTS_V1,
    PODS,
    AlreadyExists,
    Client,
    Conflict,
    EventRecorder,
    Forbidden,
    Invalid,
    NotFound,
    PatchType,
    load_kubeconfig,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def checkpoint(name: str, backend: str = "vllm") -> dict:
    return {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoCheckpoint", "metadata": {"name": name},
            "spec": {"identity": {"model": "m", "backendFramework": backend},
                     "job": {"podTemplateSpec": {"spec": {"containers": [{"name": "main", "image": "i"}]}}}}}


async def test_crud_and_errors_keep_status_reason_message(client: Client, namespace):
    created = await client.create(CONFIGMAPS, {"metadata": {"name": "a", "namespace": namespace}, "data": {"k": "v"}})
    assert created["metadata"]["uid"]
    with pytest.raises(AlreadyExists) as exists:
        await client.create(CONFIGMAPS, {"metadata": {"name": "a"}}, namespace)
    assert (exists.value.status, exists.value.reason) == (409, "AlreadyExists")
    assert 'configmaps "a" already exists' in exists.value.message

    got = await client.get(CONFIGMAPS, "a", namespace)
    got["data"]["k"] = "v2"
    updated = await client.update(CONFIGMAPS, got)
    got["data"]["k"] = "stale"
    with pytest.raises(Conflict) as conflict:
        await client.update(CONFIGMAPS, got)  # got carries the old resourceVersion
    assert conflict.value.status == 409 and "modified" in conflict.value.message
    assert updated["data"]["k"] == "v2"

    await client.delete(CONFIGMAPS, "a", namespace)
    with pytest.raises(NotFound) as missing:
        await client.get(CONFIGMAPS, "a", namespace)
    err = missing.value
    assert (err.status, err.reason, err.message) == (404, "NotFound", 'configmaps "a" not found')
    assert err.path == f"/api/v1/namespaces/{namespace}/configmaps/a" and err.method == "GET"


async def test_patch_merge_json_strategic_and_apply(client: Client, namespace):
    await client.create(CONFIGMAPS, {"metadata": {"name": "p"}, "data": {"a": "1", "b": "2"}}, namespace)
    merged = await client.patch(CONFIGMAPS, "p", {"data": {"b": None, "c": "3"}}, namespace)
    assert merged["data"] == {"a": "1", "c": "3"}
    patched = await client.patch(CONFIGMAPS, "p", [{"op": "replace", "path": "/data/a", "value": "9"}], namespace,
                                 patch_type=PatchType.JSON)
    assert patched["data"] == {"a": "9", "c": "3"}

    pod = {"metadata": {"name": "web"}, "spec": {"schedulerName": "nobody", "containers": [
        {"name": "main", "image": "busybox:1", "command": ["sleep", "1d"]}, {"name": "side", "image": "busybox:1"}]}}
    await client.create(PODS, pod, namespace)
    # Strategic merge: the containers list merges by name, so the other fields and containers stay.
    strategic = await client.patch(PODS, "web", {"spec": {"containers": [{"name": "main", "image": "busybox:2"}]}},
                                   namespace, patch_type=PatchType.STRATEGIC)
    containers = {c["name"]: c for c in strategic["spec"]["containers"]}
    assert containers["main"]["image"] == "busybox:2" and containers["main"]["command"] == ["sleep", "1d"]
    assert "side" in containers

    intent = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied", "namespace": namespace},
              "data": {"owned": "yes"}}
    applied = await client.apply(CONFIGMAPS, intent, field_manager="test-a")
    assert applied["data"] == {"owned": "yes"}
    with pytest.raises(Conflict) as conflict:
        await client.apply(CONFIGMAPS, {**intent, "data": {"owned": "no"}}, field_manager="test-b")
    assert "conflict" in conflict.value.message.lower()
    forced = await client.apply(CONFIGMAPS, {**intent, "data": {"owned": "no"}}, field_manager="test-b", force=True)
    assert forced["data"] == {"owned": "no"}


async def test_status_subresource_and_typed_decoding(client: Client, namespace):
    await client.create(DYNAMO_CHECKPOINTS, checkpoint("ck"), namespace)
    await client.patch_status(DYNAMO_CHECKPOINTS, "ck", {"status": {"phase": "Ready", "checkpointID": "abc"},
                                                         "spec": {"identity": {"model": "ignored"}}}, namespace)
    typed = await client.get(DYNAMO_CHECKPOINTS, "ck", namespace, type=DynamoCheckpoint)
    assert isinstance(typed, DynamoCheckpoint)
    assert (typed.status.phase, typed.status.checkpoint_id) == (Phase.READY, "abc")
    assert typed.spec.identity.model == "m"  # the status endpoint does not change the spec
    typed.status.message = "whole status"
    replaced = await client.update_status(DYNAMO_CHECKPOINTS, typed, type=DynamoCheckpoint)
    assert replaced.status.message == "whole status"


async def test_invalid_object_names_the_field(client: Client, namespace):
    with pytest.raises(Invalid) as invalid:
        await client.create(DYNAMO_CHECKPOINTS, checkpoint("bad", backend="bogus"), namespace)
    err = invalid.value
    assert err.status == 422 and err.reason == "Invalid"
    assert any(c.get("field") == "spec.identity.backendFramework" for c in err.details.get("causes", []))


async def test_forbidden_for_an_identity_without_rights(kube_cluster, namespace):
    if kube_cluster is None:
        pytest.skip("needs the local cluster's CA to issue an identity")
    async with Client(load_kubeconfig(kube_cluster.kubeconfig_for("nobody"))) as nobody:
        with pytest.raises(Forbidden) as forbidden:
            await nobody.list(PODS, namespace)
    assert forbidden.value.status == 403 and 'User "nobody" cannot list resource "pods"' in forbidden.value.message


async def test_list_pages_and_watch(client: Client, namespace):
    for i in range(5):
        await client.create(CONFIGMAPS, {"metadata": {"name": f"c{i}", "labels": {"set": "x"}}}, namespace)
    first = await client.list(CONFIGMAPS, namespace, label_selector="set=x", limit=2)
    assert len(first.items) == 2 and first.continue_token
    everything = await client.list_all(CONFIGMAPS, namespace, label_selector="set=x", page_size=2)
    assert sorted(i["metadata"]["name"] for i in everything.items) == [f"c{i}" for i in range(5)]
    assert {i["kind"] for i in everything.items} == {"ConfigMap"}  # filled in, as watch events have them

    seen = []
    async with client.watch(CONFIGMAPS, namespace, resource_version=everything.resource_version,
                            label_selector="set=x", timeout_seconds=30) as events:
        await client.patch(CONFIGMAPS, "c0", {"data": {"x": "1"}}, namespace)
        await client.delete(CONFIGMAPS, "c1", namespace)
        async for event in events:
            seen.append((event.type, event.object["metadata"]["name"]))
            assert event.resource_version == event.object["metadata"]["resourceVersion"]
            if len(seen) == 2:
                break
    assert seen == [("MODIFIED", "c0"), ("DELETED", "c1")]


async def test_selectors_and_a_callers_own_query_reach_the_server_as_written(client: Client, namespace):
    for name, labels in (("a", {"tier": "x", "role": "db"}), ("b", {"tier": "y"}), ("c", {"tier": "z"})):
        await client.create(CONFIGMAPS, {"metadata": {"name": name, "labels": labels}}, namespace)
    chosen = await client.list(CONFIGMAPS, namespace, label_selector="tier in (x,y),!role",
                               field_selector="metadata.name!=c")
    assert [i["metadata"]["name"] for i in chosen.items] == ["b"]
    page = await client.request("GET", f"{CONFIGMAPS.path(namespace)}?labelSelector=tier%3Dz", params={"limit": "5"})
    assert [i["metadata"]["name"] for i in page["items"]] == ["c"]


async def test_event_recorder_counts_repeats_on_one_event(client: Client, namespace):
    target = await client.create(CONFIGMAPS, {"metadata": {"name": "target"}}, namespace)
    recorder = EventRecorder(client, controller="nvidia.com/test-controller", instance="test-1")
    await recorder.warning(target, "Broken", "it broke", action="Reconcile")
    await recorder.warning(target, "Broken", "it broke", action="Reconcile")
    await recorder.normal(target, "Fixed", "all good")
    events = (await client.list(EVENTS_V1, namespace)).items
    broken = [e for e in events if e["reason"] == "Broken"]
    assert len(broken) == 1 and broken[0]["series"]["count"] == 2
    assert broken[0]["regarding"]["uid"] == target["metadata"]["uid"]
    assert broken[0]["reportingController"] == "nvidia.com/test-controller"
    # What `kubectl describe` reads: the core/v1 view of the same events.
    core = (await client.list(EVENTS, namespace, field_selector="involvedObject.name=target")).items
    assert sorted(e["reason"] for e in core) == ["Broken", "Fixed"]
