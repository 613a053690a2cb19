"""Deleting a DGD whose automatic checkpoint is in object storage removes the checkpoint's objects: the real
operator process (which holds no S3 credentials) asks once nothing writes the checkpoint any more, the
agent's real cleanup controller removes every version from a real S3 server (MinIO) and reports, and the
operator lets the DynamoCheckpoint go. A checkpoint whose ID its namespace does not derive is let go with a
warning and nothing removed."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent.artifact import s3 as s3client
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.service.cleanup import Cleaner
from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster import minio
from dynamo_snapshot.hashing import dgd_checkpoint_id
from dynamo_snapshot.kube import Client, InformerFactory, load_kubeconfig
from tests.controllers.support import checkpoint_manifest, enabled_config
from tests.controllers.test_dgd_controller import auto_checkpoint_name, confirm_checkpoint, dgd_manifest

pytestmark = pytest.mark.integration

PREFIX = "fleet"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[minio.Minio]:
    if reason := minio.missing():
        pytest.skip(reason)
    with minio.running(tmp_path_factory.mktemp("minio")) as running:
        yield running


@pytest.fixture
def remote(server: minio.Minio) -> ObjectStorage:
    bucket = server.create_bucket(f"t-{uuid.uuid4().hex[:12]}")
    return ObjectStorage(s3client.S3Client(s3client.S3Settings(
        bucket=bucket, endpoint=server.endpoint, region=minio.REGION, path_style=True,
        access_key_id=server.user, secret_access_key=server.password)), PREFIX)


def put_versions(server: minio.Minio, remote: ObjectStorage, checkpoint_id: str) -> list[str]:
    keys = [f"{PREFIX}/{checkpoint_id}/versions/{v}/{rel}" for v in ("1", "2")
            for rel in ("pages-1.img", "manifest.json.mac", "manifest.json")]
    for key in keys:
        status, _ = server.request("PUT", f"/{remote.client.settings.bucket}/{key}", body=key.encode())
        assert status == 200
    return keys


def keys(server: minio.Minio, remote: ObjectStorage) -> list[str]:
    return sorted(key for key, _, _ in server.list_objects(remote.client.settings.bucket))


@contextlib.contextmanager
def agent_cleaner(kubeconfig: Path, namespace: str, remote: ObjectStorage) -> Iterator[None]:
    """The agent's cleanup controller (service/cleanup.py) on its own event loop, for the block."""
    stop = threading.Event()
    failed: list[BaseException] = []

    async def main() -> None:
        async with Client(load_kubeconfig(kubeconfig)) as client:
            factory = InformerFactory(client)
            cleaner = Cleaner(client, factory, remote, watched_namespace=namespace, identity="snapshot-agent-node-1")
            async with anyio.create_task_group() as tg:
                await tg.start(factory.run)
                tg.start_soon(cleaner.controller.run)
                await anyio.to_thread.run_sync(stop.wait)
                tg.cancel_scope.cancel()

    def run() -> None:
        try:
            anyio.run(main)
        except BaseException as exc:  # reported in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="agent-cleaner")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert not failed, failed


def test_deleting_the_dgd_removes_its_checkpoints_objects_from_the_bucket_through_an_agent(
        cluster, start_operator, kubeconfig, server, remote):
    start_operator(enabled_config(type="s3", s3={"bucket": remote.client.settings.bucket, "prefix": PREFIX}))
    cluster.apply(dgd_manifest())
    name = auto_checkpoint_name(cluster)
    confirm_checkpoint(cluster, name)
    checkpoint_id = name.removeprefix("checkpoint-")
    gone = put_versions(server, remote, checkpoint_id)
    kept = put_versions(server, remote, checkpoint_id[:-1] + "x")  # another checkpoint's, one letter apart
    job = cluster.get("dynamocheckpoint", name)["status"]["jobName"]
    cluster.agent_lease(job, checkpoint_id, duration=4)  # an agent still finalizes (say, uploads) under it
    # the renewal the Lease records (the time is taken before kubectl's apply, which can take a second here)
    renewed = dt.datetime.fromisoformat(cluster.get("lease", job)["spec"]["renewTime"].replace("Z", "+00:00"))
    with agent_cleaner(kubeconfig, cluster.namespace, remote):
        cluster.kubectl("delete", "dgd", "graph", "-n", cluster.namespace, "--wait=false")
        cluster.kubectl("wait", f"dynamocheckpoint/{name}", "-n", cluster.namespace, "--for=delete",
                        "--timeout=90s")
    assert keys(server, remote) == sorted(kept)
    assert len(gone) == 6
    events = {e["reason"]: e for e in cluster.events(name)}
    assert events["CleanupStarted"]["note"] == (f"asked the snapshot agents to remove s3://{remote.client.settings.bucket}"
                                                f"/{PREFIX}/{checkpoint_id}/")
    assert events["CleanupSucceeded"]["note"].startswith(
        f"removed 6 objects under s3://{remote.client.settings.bucket}/{PREFIX}/{checkpoint_id}/ "
        "(agent snapshot-agent-node-1)")
    asked = dt.datetime.fromisoformat(events["CleanupStarted"]["eventTime"].replace("Z", "+00:00"))
    assert asked >= renewed + dt.timedelta(seconds=4) - dt.timedelta(milliseconds=10), "asked under a live Lease"


def test_a_checkpoint_whose_id_its_namespace_does_not_derive_is_let_go_with_its_objects_kept(
        cluster, start_operator, kubeconfig, server, remote):
    start_operator(enabled_config(type="s3", s3={"bucket": remote.client.settings.bucket, "prefix": PREFIX}))
    victim = dgd_checkpoint_id("someone-else", "their-graph", str(uuid.uuid4()), "worker", "abcd1234")
    kept = put_versions(server, remote, victim)
    forged = checkpoint_manifest("forged")
    forged["metadata"].update({
        "finalizers": [names.FINALIZER_CHECKPOINT_CLEANUP], "annotations": {names.ANN_AUTO_CHECKPOINT: "true"},
        "labels": {names.LABEL_CHECKPOINT_ID: victim, names.LABEL_DGD_NAME: "their-graph",
                   names.LABEL_COMPONENT: "worker"}})
    cluster.apply(forged)
    cluster.wait_phase("forged", "Creating")
    with agent_cleaner(kubeconfig, cluster.namespace, remote):
        cluster.kubectl("delete", "dynamocheckpoint", "forged", "-n", cluster.namespace, "--timeout=90s")
    assert keys(server, remote) == sorted(kept)
    skipped = cluster.wait_event("forged", "CleanupSkipped")
    assert skipped["note"].startswith(f"objects of checkpoint {victim} not removed from s3://")
    assert "CleanupStarted" not in {e["reason"] for e in cluster.events("forged")}
