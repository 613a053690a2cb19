"""The checkpoint controller's rules as pure functions: the agent-confirmation table, the Job's shape,
ID resolution and storage discovery. The same rules run end to end in test_checkpoint_controller.py."""

import datetime as dt

import pytest

from dynamo_snapshot.api import DynamoCheckpoint, OperatorConfig, Phase, convert, names, parse_config
from dynamo_snapshot.controllers.checkpoint.ids import MissingAutoCheckpointID, job_name, resolve_checkpoint_id
from dynamo_snapshot.controllers.checkpoint.job import OUTCOME_FINALIZER, build_checkpoint_job
from dynamo_snapshot.controllers.checkpoint.outcome import UNCONFIRMED_MESSAGE, decide
from dynamo_snapshot.controllers.podshape import MissingContainer
from dynamo_snapshot.controllers.storage import (
    Storage,
    StorageNotReady,
    StorageUnavailable,
    resolve_storage,
)

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)

READY_PROBE = ["sh", "-c", "cat /snapshot-control/ready-for-snapshot 2>/dev/null "
               "|| cat /snapshot-control/ready-for-checkpoint"]


def _job(conditions=(), annotation=None):
    annotations = {names.ANN_CHECKPOINT_STATUS: annotation} if annotation else {}
    return {"metadata": {"name": "checkpoint-job-x-1", "annotations": annotations},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m}
                                      for t, r, m in conditions]}}


def _lease(renewed_ago: float, duration: int = 15, holder: str = "agent-node-1"):
    renew = (NOW - dt.timedelta(seconds=renewed_ago)).isoformat().replace("+00:00", "Z")
    return {"spec": {"holderIdentity": holder, "renewTime": renew, "leaseDurationSeconds": duration}}


COMPLETE = ("Complete", "", "")


def test_agent_failed_annotation_fails():
    out = decide(_job(annotation="failed"), lease=None, pods=[], target="main", now=NOW)
    assert (out.phase, out.reason) == (Phase.FAILED, "JobFailed")


def test_the_agents_reason_reaches_the_status_message():
    job = _job(annotation="failed")
    job["metadata"]["annotations"][names.ANN_CHECKPOINT_MESSAGE] = "criu dump failed with exit code 1"
    out = decide(job, lease=None, pods=[], target="main", now=NOW)
    assert out.message == ("snapshot-agent reported the checkpoint of Job checkpoint-job-x-1 as failed: "
                           "criu dump failed with exit code 1")


def test_agent_failed_after_job_completed_is_a_verification_failure():
    out = decide(_job([COMPLETE], annotation="failed"), lease=None, pods=[], target="main", now=NOW)
    assert (out.phase, out.reason) == (Phase.FAILED, "CheckpointVerificationFailed")


def test_complete_and_confirmed_is_ready():
    out = decide(_job([COMPLETE], annotation="completed"), lease=None, pods=[], target="main", now=NOW)
    assert out.phase is Phase.READY


def test_complete_unconfirmed_with_live_lease_waits_about_a_second():
    out = decide(_job([COMPLETE]), lease=_lease(renewed_ago=2), pods=[], target="main", now=NOW)
    assert out.phase is None and 0 < out.requeue_after <= 1.0


@pytest.mark.parametrize("lease", [None, _lease(renewed_ago=30), _lease(renewed_ago=1, holder="")])
def test_complete_unconfirmed_without_live_lease_fails(lease):
    out = decide(_job([COMPLETE]), lease=lease, pods=[], target="main", now=NOW)
    assert (out.phase, out.message) == (Phase.FAILED, UNCONFIRMED_MESSAGE)


def test_job_failure_carries_the_pods_reason():
    pod = {"metadata": {"name": "p1"}, "status": {"containerStatuses": [
        {"name": "main", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}}
    out = decide(_job([("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]),
                 lease=None, pods=[pod], target="main", now=NOW)
    assert out.phase is Phase.FAILED
    assert "DeadlineExceeded" in out.message and "OOMKilled (exit code 137)" in out.message


def test_running_job_decides_nothing():
    assert decide(_job(annotation="completed"), lease=None, pods=[], target="main", now=NOW).phase is None


def _ckpt(**meta):
    return convert({
        "metadata": {"name": "c", "namespace": "ns", "uid": "u-1", **meta},
        "spec": {"identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
                 "job": {"podTemplateSpec": {"spec": {"containers": [
                     {"name": "main", "image": "placeholder", "livenessProbe": {"exec": {"command": ["x"]}},
                      "startupProbe": {"exec": {"command": ["y"]}}, "readinessProbe": {"httpGet": {"port": 80}}},
                     {"name": "sidecar", "image": "s"}]}}}},
    }, DynamoCheckpoint)


def test_id_resolution_order():
    assert resolve_checkpoint_id(_ckpt()) == "96429b2725761a09"
    assert resolve_checkpoint_id(_ckpt(labels={names.LABEL_CHECKPOINT_ID: "from-label"})) == "from-label"
    auto = {names.ANN_AUTO_CHECKPOINT: "true"}
    with pytest.raises(MissingAutoCheckpointID):
        resolve_checkpoint_id(_ckpt(annotations=auto))
    assert resolve_checkpoint_id(_ckpt(annotations=auto, labels={names.LABEL_CHECKPOINT_ID: "a" * 32})) == "a" * 32
    recorded = _ckpt(labels={names.LABEL_CHECKPOINT_ID: "from-label"})
    recorded.status.identity_hash = "from-identity-hash"
    assert resolve_checkpoint_id(recorded) == "from-identity-hash"
    recorded.status.checkpoint_id = "from-status"
    assert resolve_checkpoint_id(recorded) == "from-status"


def test_job_shape():
    storage = Storage(mode=OperatorConfig().checkpoint.storage.access_mode, pvc_name="snapshot-pvc",
                      base_path="/checkpoints")
    job = build_checkpoint_job(_ckpt(), name=job_name("abc", "1"), checkpoint_id="abc", artifact_version="1",
                               storage=storage)
    assert job["metadata"]["name"] == "checkpoint-job-abc-1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert OUTCOME_FINALIZER in job["metadata"]["finalizers"]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 300
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"] == {names.LABEL_CHECKPOINT_ID: "abc", names.LABEL_IS_CHECKPOINT_SOURCE: "true"}
    assert pod["metadata"]["annotations"][names.ANN_TARGET_CONTAINERS] == "main"
    assert pod["metadata"]["annotations"][names.ANN_ARTIFACT_VERSION] == "1"
    assert pod["spec"]["restartPolicy"] == "Never"
    main, sidecar = pod["spec"]["containers"]
    assert main["readinessProbe"] == {"exec": {"command": READY_PROBE},
                                      "periodSeconds": 1, "failureThreshold": 3}
    assert "livenessProbe" not in main and "startupProbe" not in main
    assert {"name": "snapshot-control", "mountPath": "/snapshot-control", "subPath": "main"} in main["volumeMounts"]
    assert {"name": "DYN_SNAPSHOT_CONTROL_DIR", "value": "/snapshot-control"} in main["env"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert "checkpoint-storage" not in volumes  # agentMount: the pod never mounts the PVC
    assert "volumeMounts" not in sidecar


def test_a_command_keeps_snapshot_init_as_pid_1():
    ckpt = _ckpt()
    ckpt.spec.job.pod_template_spec["spec"]["containers"][0]["command"] = ["python3", "-m", "dynamo.vllm"]
    job = build_checkpoint_job(ckpt, name="j", checkpoint_id="abc", artifact_version="1", storage=None)
    main, sidecar = job["spec"]["template"]["spec"]["containers"]
    assert main["command"] == ["/usr/local/bin/snapshot-init", "--", "python3", "-m", "dynamo.vllm"]
    assert "command" not in sidecar
    # without a command the image's entrypoint (snapshot-init) runs: nothing to add
    assert "command" not in build_checkpoint_job(_ckpt(), name="j", checkpoint_id="abc", artifact_version="1",
                                                 storage=None)["spec"]["template"]["spec"]["containers"][0]


def test_pod_mount_job_mounts_the_pvc_at_base_path():
    config = parse_config("checkpoint: {enabled: true, storage: {accessMode: podMount}}")
    storage = resolve_storage("ns", config, pvc_names=["snapshot-pvc"])
    job = build_checkpoint_job(_ckpt(), name="j", checkpoint_id="abc", artifact_version="1", storage=storage)
    main = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "checkpoint-storage", "mountPath": "/checkpoints"} in main["volumeMounts"]


def test_missing_target_container_names_the_field():
    ckpt = _ckpt()
    ckpt.spec.job.target_container_name = "worker"
    with pytest.raises(MissingContainer, match=r"spec\.job\.targetContainerName: no container named 'worker'"):
        build_checkpoint_job(ckpt, name="j", checkpoint_id="abc", artifact_version="1", storage=None)


def _agent_ds(volume=True):
    volumes = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt-pvc"}}] if volume else []
    return {"metadata": {"name": "snapshot-agent", "labels": {"app.kubernetes.io/component": "snapshot-agent"}},
            "spec": {"template": {"spec": {"volumes": volumes, "containers": [
                {"name": "agent", "volumeMounts": [{"name": "checkpoints", "mountPath": "/data/ckpt"}]}]}}}}


def test_agent_mount_storage_discovery():
    config = OperatorConfig()
    assert resolve_storage("ns", config, daemonsets=[_agent_ds()]) == Storage(
        config.checkpoint.storage.access_mode, "ckpt-pvc", "/data/ckpt")
    with pytest.raises(StorageUnavailable, match=r"^no snapshot-agent daemonset found in namespace ns$"):
        resolve_storage("ns", config, daemonsets=[])
    with pytest.raises(StorageUnavailable, match="does not mount a PVC-backed checkpoint volume"):
        resolve_storage("ns", config, daemonsets=[_agent_ds(volume=False)])


def test_pod_mount_storage_missing_pvc():
    config = parse_config("checkpoint: {storage: {accessMode: podMount}}")
    with pytest.raises(StorageUnavailable) as err:
        resolve_storage("ns", config, pvc_names=[])
    assert str(err.value) == (
        "checkpoint storage PVC ns/snapshot-pvc does not exist and checkpoint.storage.pvc.create is false")
    creating = parse_config("checkpoint: {storage: {accessMode: podMount, pvc: {create: true, size: 10Gi}}}")
    with pytest.raises(StorageNotReady):
        resolve_storage("ns", creating, pvc_names=[])
