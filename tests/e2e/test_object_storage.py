"""Object storage on the local stack, all real: MinIO on loopback as the storage (``storage.type: s3`` for the
operator and the agent). A CPU worker is checkpointed into the bucket - the manifest, the commit point, is the
last object written - and a DGD's worker is restored from the bucket, with the node-local copy gone first: the
version lands in the agent's node cache."""

from __future__ import annotations

import time

import pytest

from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster.scenarios import Flow, checkpoint_manifest, component_selector, dgd_manifest
from dynamo_snapshot.devcluster.stack import S3_BUCKET, S3_PREFIX

pytestmark = pytest.mark.e2e

STORAGE_MODE = "s3"


def test_a_worker_checkpointed_into_the_bucket_is_restored_from_it(flow: Flow):
    stack = flow.stack
    assert stack.minio is not None
    run = flow.create_checkpoint(checkpoint_manifest("to-bucket"))
    ckpt = stack.get("dckpt", "to-bucket")
    assert ckpt["status"]["storageType"] == "s3"
    assert ckpt["status"]["location"] == f"s3://{S3_BUCKET}/{S3_PREFIX}/{run.checkpoint_id}"
    source = stack.get("pod", run.source_pod)
    assert source["metadata"]["annotations"][names.ANN_STORAGE_TYPE] == "s3"
    assert not any("persistentVolumeClaim" in v for v in source["spec"]["volumes"])  # no PVC anywhere

    version = f"{S3_PREFIX}/{run.checkpoint_id}/versions/1/"
    objects = {key.removeprefix(version): (modified, size)
               for key, modified, size in stack.minio.list_objects(S3_BUCKET, version)}
    assert names.MANIFEST_FILE in objects and names.MANIFEST_MAC_FILE in objects
    assert any(key.startswith("pages-") for key in objects)
    assert sum(size for _, size in objects.values()) >= run.artifact_bytes > 0
    last = objects.pop(names.MANIFEST_FILE)[0]  # ISO 8601 in UTC: ordered as text
    assert all(modified <= last for modified, _ in objects.values()), "the manifest must be written last"

    # confirmed in the bucket, the version left the checkpointing node's disk: the restore comes from the bucket
    assert not (stack.objects / run.checkpoint_id / names.VERSIONS_DIR / "1").exists()
    started = time.time()
    stack.apply(dgd_manifest("from-bucket", replicas=1, checkpoint_ref="to-bucket"))
    (restored,) = flow.wait_restored(component_selector("from-bucket"), 1, started)
    assert restored.instance == run.instance and restored.heap_ok
    assert "fetch" in restored.stages  # the pipeline's object-storage stage ran
    # fetched into the node cache (budgeted, pinned while read), the one node-local copy of it
    assert (stack.node_cache / run.checkpoint_id / "1" / names.MANIFEST_FILE).is_file()
    assert not (stack.objects / run.checkpoint_id / "versions").exists()


def test_deleting_a_dgd_removes_its_automatic_checkpoint_from_the_bucket_and_nothing_else(flow: Flow):
    stack = flow.stack
    assert stack.minio is not None
    started = time.time()
    stack.apply(dgd_manifest("short-lived", replicas=0, policy="WaitForCheckpoint"))
    name = flow.auto_checkpoint_name("short-lived")
    run = flow.wait_checkpoint(name, started)
    mine = f"{S3_PREFIX}/{run.checkpoint_id}/"
    assert any(key.endswith("/" + names.MANIFEST_FILE) for key, _, _ in stack.minio.list_objects(S3_BUCKET, mine))
    others = sorted(key for key, _, _ in stack.minio.list_objects(S3_BUCKET) if not key.startswith(mine))
    stack.kubectl("delete", names.DGD_KUBECTL_V1ALPHA1, "short-lived", "-n", stack.namespace, "--wait=false")
    # the agent (the only holder of the S3 credentials) removes the objects; then the operator lets it go
    stack.kubectl("wait", f"dynamocheckpoint/{name}", "-n", stack.namespace, "--for=delete", "--timeout=120s",
                  timeout=130)
    assert stack.minio.list_objects(S3_BUCKET, mine) == []
    assert sorted(key for key, _, _ in stack.minio.list_objects(S3_BUCKET)) == others  # the other checkpoints stay
