"""Which pods ask the agent for what (podwork): a checkpoint of a ready source, a restore once the
placeholder runs, never twice; where podMount storage is."""

from __future__ import annotations

import pytest

from dynamo_snapshot.agent.service import podwork
from dynamo_snapshot.api import names

ID = "abc123"


def pod(*, source: bool, ready: bool = True, container_id: str | None = "containerd://c1", phase: str = "Running",
        annotations: dict[str, str] | None = None, targets: str = "main") -> dict:
    labels = {names.LABEL_CHECKPOINT_ID: ID}
    metadata = {"namespace": "ns", "name": "p", "uid": "u", "labels": labels,
                "annotations": {names.ANN_TARGET_CONTAINERS: targets, **(annotations or {})}}
    if source:
        labels[names.LABEL_IS_CHECKPOINT_SOURCE] = "true"
        metadata["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "job-1", "uid": "j",
                                        "controller": True}]
    status = {"name": "main", "ready": ready, "state": {"running": {}} if container_id else {"waiting": {}}}
    if container_id:
        status["containerID"] = container_id
    return {"metadata": metadata, "status": {"phase": phase, "containerStatuses": [status]}}


def test_a_ready_source_pod_asks_for_a_checkpoint_of_its_target():
    (work,) = podwork.work_for(pod(source=True))
    assert isinstance(work, podwork.CheckpointWork)
    assert (work.job, work.container, work.container_id, work.checkpoint_id, work.artifact_version) == (
        "job-1", "main", "c1", ID, "1")


@pytest.mark.parametrize("change", ["not ready", "no job", "two targets", "being deleted"])
def test_a_source_pod_asks_for_nothing_until_it_can_be_checkpointed(change):
    obj = pod(source=True, ready=change != "not ready", targets="main,side" if change == "two targets" else "main")
    if change == "no job":
        obj["metadata"].pop("ownerReferences")
    if change == "being deleted":
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert podwork.work_for(obj) == []


def test_a_restore_pod_asks_for_a_restore_once_its_container_runs():
    assert podwork.work_for(pod(source=False, container_id=None, phase="Pending")) == []
    (work,) = podwork.work_for(pod(source=False, ready=False))
    assert isinstance(work, podwork.RestoreWork) and work.container_id == "c1" and not work.interrupted
    assert podwork.work_for(pod(source=False, phase="Succeeded")) == []


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_container_id_is_never_restored_twice(status):
    done = {names.restore_status_annotation("main"): status, names.restore_container_id_annotation("main"): "c1"}
    if status == "completed":
        assert podwork.work_for(pod(source=False, annotations=done)) == []
    else:  # failed, yet still running: its kill did not land; it is killed again, never restored
        (work,) = podwork.work_for(pod(source=False, annotations=done))
        assert work.unkilled and not work.interrupted
        refused = {**done, names.restore_refused_annotation("main"): ID}  # told so, left running
        assert podwork.work_for(pod(source=False, annotations=refused)) == []
    # A new container (the kubelet restarted it) is a new restore.
    (work,) = podwork.work_for(pod(source=False, annotations=done, container_id="containerd://c2"))
    assert work.container_id == "c2"


def test_a_restore_left_in_progress_for_the_running_container_is_interrupted():
    left = {names.restore_status_annotation("main"): "in_progress", names.restore_container_id_annotation("main"): "c1"}
    (work,) = podwork.work_for(pod(source=False, annotations=left))
    assert work.interrupted


def test_pod_mount_storage_path_comes_from_the_pod_when_it_says():
    obj = pod(source=True, annotations={names.ANN_STORAGE_BASE_PATH: "/data/ckpts"})
    assert podwork.work_for(obj)[0].base_path == "/data/ckpts"


def test_a_pod_for_other_storage_than_the_agent_has_is_refused_naming_both(tmp_path):
    import anyio

    from dynamo_snapshot.agent.artifact import authn
    from dynamo_snapshot.agent.errors import CheckpointError, RestoreError
    from dynamo_snapshot.agent.service.nodeops import CriuNode

    (work,) = podwork.work_for(pod(source=True, annotations={names.ANN_STORAGE_TYPE: "s3"}))
    (restore,) = podwork.work_for(pod(source=False, annotations={names.ANN_STORAGE_TYPE: "s3"}))
    assert work.storage_type == restore.storage_type == "s3"
    authn.create_key(tmp_path / "keys", "k1")
    node = CriuNode(None, None, None, None, keyring=authn.Keyring.from_directory(tmp_path / "keys"))  # a pvc agent
    refusal = r"pod ns/p is for s3 storage .* but this agent's storage.type is pvc: set the operator's"
    with pytest.raises(CheckpointError, match=refusal):
        anyio.run(node.checkpoint, work, None)
    with pytest.raises(RestoreError, match=refusal):
        anyio.run(node.restore, restore)
