"""Deleting a checkpoint from object storage, the agent's part, against the real API server and a real S3
server (MinIO): asked through the deleted DynamoCheckpoint's condition, one agent removes every version
under the checkpoint's prefix and nothing else, and says so on its Lease; an ID the checkpoint's namespace
does not derive is refused, and nothing is removed before the operator asks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.service.cleanup import Cleaner
from dynamo_snapshot.api import names
from dynamo_snapshot.hashing import dgd_checkpoint_id
from dynamo_snapshot.kube import DYNAMO_CHECKPOINTS, LEASES, Client, InformerFactory, NotFound
from tests.agent.test_object_storage import client_for

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

PREFIX = "fleet"


async def automatic_checkpoint(client: Client, namespace: str, dgd: str, *, forged_id: str = "") -> tuple[str, str]:
    """A DGD's automatic DynamoCheckpoint as the operator makes it (finalizer, labels, identity); its ID is
    the one its namespace derives, or ``forged_id`` (a label naming someone else's). Returns (name, ID)."""
    dgd_uid = str(uuid.uuid4())
    checkpoint_id = forged_id or dgd_checkpoint_id(namespace, dgd, dgd_uid, "worker", "abcd1234")
    name = f"checkpoint-{dgd}"
    await client.create(DYNAMO_CHECKPOINTS, {
        "apiVersion": names.API_VERSION, "kind": names.CHECKPOINT_KIND,
        "metadata": {"name": name, "finalizers": [names.FINALIZER_CHECKPOINT_CLEANUP],
                     "annotations": {names.ANN_AUTO_CHECKPOINT: "true"},
                     "labels": {names.LABEL_CHECKPOINT_ID: checkpoint_id, names.LABEL_DGD_NAME: dgd,
                                names.LABEL_COMPONENT: "worker", names.LABEL_WORKER_HASH: "abcd1234"}},
        "spec": {"identity": {"model": f"{namespace}/{dgd}", "backendFramework": "vllm",
                              "extraParameters": {"dgdUID": dgd_uid, "component": "worker",
                                                  "checkpointID": checkpoint_id}},
                 "job": {"podTemplateSpec": {"spec": {"containers": [{"name": "main", "image": "w:1"}]}}}},
    }, namespace)
    await client.patch_status(DYNAMO_CHECKPOINTS, name, {"status": {
        "phase": "Ready", "checkpointID": checkpoint_id, "storageType": "s3"}}, namespace)
    return name, checkpoint_id


async def delete(client: Client, namespace: str, name: str, *, request: bool) -> None:
    """The DynamoCheckpoint deleted (its finalizer holds it) and, with ``request``, the operator's ask."""
    await client.delete(DYNAMO_CHECKPOINTS, name, namespace)
    if request:
        await client.patch_status(DYNAMO_CHECKPOINTS, name, {"status": {"conditions": [{
            "type": names.CONDITION_ARTIFACTS_REMOVED, "status": "False", "reason": names.REASON_CLEANUP_REQUESTED,
            "message": "waiting for a snapshot agent", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, namespace)


async def put_versions(s3, checkpoint_id: str, prefix: str = PREFIX) -> list[str]:
    """Two committed versions of a checkpoint (data objects, MAC, manifest); returns their keys."""
    keys = [f"{prefix}/{checkpoint_id}/versions/{v}/{rel}" for v in ("1", "2")
            for rel in ("pages-1.img", "sub/core-1.img", "manifest.json.mac", "manifest.json")]
    for key in keys:
        await s3.put_bytes(key, key.encode())
    return keys


async def lease_outcome(client: Client, namespace: str, checkpoint_id: str) -> dict[str, Any] | None:
    try:
        return await client.get(LEASES, names.CLEANUP_LEASE_PREFIX + checkpoint_id, namespace)
    except NotFound:
        return None


async def until(check: Callable[[], Any]) -> Any:
    """Poll the async ``check`` until it returns something true (a Lease the agent writes has no event here)."""
    with anyio.fail_after(30):
        while True:
            if value := await check():
                return value
            await anyio.sleep(0.1)


async def run_cleaners(client: Client, namespace: str, remote: ObjectStorage, body: Callable[[], Any]) -> None:
    """Two agents (two nodes) serving the namespace, as the DaemonSet has them, while ``body`` runs."""
    factory = InformerFactory(client)
    cleaners = [Cleaner(client, factory, remote, watched_namespace=namespace, identity=f"snapshot-agent-node-{n}")
                for n in (1, 2)]
    async with anyio.create_task_group() as tg:
        await tg.start(factory.run)
        for cleaner in cleaners:
            tg.start_soon(cleaner.controller.run)
        await body()
        tg.cancel_scope.cancel()


async def let_go(client: Client, namespace: str, *names_: str) -> None:
    """What the operator does once the outcome is there: the finalizer released."""
    for name in names_:
        await client.patch(DYNAMO_CHECKPOINTS, name, {"metadata": {"finalizers": None}}, namespace)


async def test_a_requested_cleanup_removes_every_version_of_the_checkpoint_and_nothing_else(
        client, namespace, minio_server, bucket):
    s3 = client_for(minio_server, bucket)
    remote = ObjectStorage(s3, PREFIX)
    name, checkpoint_id = await automatic_checkpoint(client, namespace, "graph")
    waiting, waiting_id = await automatic_checkpoint(client, namespace, "other")
    gone = await put_versions(s3, checkpoint_id)
    kept = [*await put_versions(s3, checkpoint_id + "0"),  # an ID that starts with this one
            *await put_versions(s3, checkpoint_id, prefix="team-b"),  # another prefix of the bucket
            *await put_versions(s3, waiting_id)]  # deleted, but the operator has not asked yet
    await delete(client, namespace, waiting, request=False)
    await delete(client, namespace, name, request=True)

    async def body() -> None:
        async def completed() -> dict[str, Any] | None:
            lease = await lease_outcome(client, namespace, checkpoint_id)
            annotations = (lease or {}).get("metadata", {}).get("annotations") or {}
            return lease if annotations.get(names.ANN_CLEANUP_STATUS) == names.STATUS_COMPLETED else None

        lease = await until(completed)
        meta = lease["metadata"]
        assert meta["annotations"][names.ANN_CLEANUP_MESSAGE].startswith(
            f"removed {len(gone)} objects under s3://{bucket}/{PREFIX}/{checkpoint_id}/ (agent snapshot-agent-node-")
        ckpt = await client.get(DYNAMO_CHECKPOINTS, name, namespace)
        owners = [(r["kind"], r["uid"]) for r in meta["ownerReferences"]]
        assert owners == [("DynamoCheckpoint", ckpt["metadata"]["uid"])]  # garbage-collected with it
        assert meta["labels"] == {names.LABEL_CHECKPOINT_ID: checkpoint_id}
        assert await s3.list_keys(f"{PREFIX}/{checkpoint_id}") == []
        assert sorted(key for key, _, _ in minio_server.list_objects(bucket)) == sorted(kept)
        assert await lease_outcome(client, namespace, waiting_id) is None

    await run_cleaners(client, namespace, remote, body)
    await let_go(client, namespace, name, waiting)


async def test_a_checkpoint_naming_an_id_its_namespace_does_not_derive_has_nothing_removed(
        client, namespace, minio_server, bucket):
    s3 = client_for(minio_server, bucket)
    victim = dgd_checkpoint_id("someone-else", "their-graph", str(uuid.uuid4()), "worker", "abcd1234")
    kept = await put_versions(s3, victim)  # another namespace's checkpoint, in the shared bucket
    name, _ = await automatic_checkpoint(client, namespace, "graph", forged_id=victim)
    await delete(client, namespace, name, request=True)

    async def body() -> None:
        async def failed() -> dict[str, Any] | None:
            lease = await lease_outcome(client, namespace, victim)
            annotations = (lease or {}).get("metadata", {}).get("annotations") or {}
            return annotations if annotations.get(names.ANN_CLEANUP_STATUS) == names.STATUS_FAILED else None

        annotations = await until(failed)
        assert annotations[names.ANN_CLEANUP_MESSAGE].startswith(
            f"not removed: checkpoint ID {victim} is not the one DynamoCheckpoint {namespace}/{name} derives")
        assert sorted(key for key, _, _ in minio_server.list_objects(bucket)) == sorted(kept)

    await run_cleaners(client, namespace, ObjectStorage(s3, PREFIX), body)
    await let_go(client, namespace, name)
