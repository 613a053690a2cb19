"""The checkpoint and PVC controllers in a real operator process against a real control plane with
kube-controller-manager (the real Job controller makes the pods). The test plays the kubelet (pod status)
and the snapshot agent (the Job annotation and the Lease)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.controllers.support import agent_daemonset, checkpoint_manifest, enabled_config, eventually

pytestmark = pytest.mark.integration

LLAMA_ID = "96429b2725761a09"  # the legacy identity hash of meta-llama/Llama-2-7b-hf + vllm
LLAMA_JOB = f"checkpoint-job-{LLAMA_ID}-1"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dynamocheckpoint.yaml"

READY_PROBE = ["sh", "-c", "cat /snapshot-control/ready-for-snapshot 2>/dev/null "
               "|| cat /snapshot-control/ready-for-checkpoint"]


@pytest.fixture
def agent_mount(cluster):
    cluster.apply(agent_daemonset())
    return cluster


def test_an_s3_checkpoint_needs_no_pvc_and_says_where_it_is_in_the_bucket(cluster, start_operator):
    start_operator(enabled_config(type="s3", s3={"bucket": "ckpts", "prefix": "fleet"}))  # no agent DaemonSet here
    cluster.apply(checkpoint_manifest("s3-ckpt"))
    ckpt = cluster.wait_phase("s3-ckpt", "Creating")
    checkpoint_id = ckpt["status"]["checkpointID"]
    assert (ckpt["status"]["storageType"], ckpt["status"]["location"]) == ("s3", f"s3://ckpts/fleet/{checkpoint_id}")
    pod = cluster.job_pod(ckpt["status"]["jobName"])
    assert not any("persistentVolumeClaim" in v for v in pod["spec"]["volumes"])
    assert pod["metadata"]["annotations"]["nvidia.com/snapshot-storage-type"] == "s3"


def test_seed_example_reaches_ready_once_the_agent_confirms(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    example = yaml.safe_load(EXAMPLE.read_text())
    cluster.apply(example)
    name = example["metadata"]["name"]
    ckpt = cluster.wait_phase(name, "Creating")
    checkpoint_id, job_name = ckpt["status"]["checkpointID"], ckpt["status"]["jobName"]
    assert ckpt["status"]["identityHash"] == checkpoint_id
    assert job_name == f"checkpoint-job-{checkpoint_id}-1"
    assert (ckpt["status"]["storageType"], ckpt["status"]["location"]) == ("pvc", f"/checkpoints/{checkpoint_id}")
    assert ckpt["metadata"].get("labels", {}).get("nvidia.com/snapshot-checkpoint-id") in (None, checkpoint_id)

    job = cluster.get("job", job_name)
    assert job["metadata"]["ownerReferences"][0]["name"] == name
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 300
    assert job["metadata"]["labels"]["nvidia.com/snapshot-checkpoint-id"] == checkpoint_id
    pod = cluster.job_pod(job_name)  # made by the real Job controller from our template
    assert pod["metadata"]["labels"]["nvidia.com/snapshot-is-checkpoint-source"] == "true"
    assert pod["metadata"]["annotations"]["nvidia.com/snapshot-target-containers"] == "main"
    main = pod["spec"]["containers"][0]
    assert main["readinessProbe"]["exec"]["command"] == READY_PROBE
    assert {"name": "DYN_SNAPSHOT_CONTROL_DIR", "value": "/snapshot-control"} in main["env"]
    assert any(e["name"] == "HF_TOKEN" for e in main["env"])  # the user's env is kept

    cluster.agent_verdict(job_name, "completed")  # the agent confirms, then the workload exits 0
    cluster.finish_pod(pod["metadata"]["name"])
    ready = cluster.wait_phase(name, "Ready")
    assert ready["status"]["createdAt"]
    conditions = {c["type"]: c for c in ready["status"]["conditions"]}
    assert conditions["JobCreated"]["status"] == "True" and conditions["JobCompleted"]["status"] == "True"
    cluster.wait_event(name, "CheckpointReady")
    # the verdict is recorded, so the Job is released to its TTL
    eventually(lambda: "nvidia.com/checkpoint-outcome" not in
               cluster.get("job", job_name)["metadata"].get("finalizers", []), what="the Job's release")


def test_a_complete_job_alone_is_not_enough(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("unconfirmed"))
    cluster.wait_phase("unconfirmed", "Creating")
    cluster.run_job_to(LLAMA_JOB)
    failed = cluster.wait_phase("unconfirmed", "Failed")
    assert failed["status"]["message"] == "completed without snapshot-agent completion confirmation"


def test_live_lease_holds_the_decision_until_it_expires(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("finalizing"))
    cluster.wait_phase("finalizing", "Creating")
    cluster.agent_lease(LLAMA_JOB, LLAMA_ID, duration=4)
    cluster.run_job_to(LLAMA_JOB)
    time.sleep(1.5)  # the agent is still finalizing: nothing may be decided while its Lease is live
    assert cluster.get("dynamocheckpoint", "finalizing")["status"]["phase"] == "Creating"
    # the agent dies without confirming: the Lease expires and the checkpoint fails
    failed = cluster.wait_phase("finalizing", "Failed", timeout=30)
    assert failed["status"]["message"] == "completed without snapshot-agent completion confirmation"


def test_live_lease_then_confirmation_is_ready(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("confirmed-late"))
    cluster.wait_phase("confirmed-late", "Creating")
    cluster.agent_lease(LLAMA_JOB, LLAMA_ID, duration=30)
    cluster.run_job_to(LLAMA_JOB)
    time.sleep(1.5)  # Complete without a verdict, but the agent still holds its Lease: nothing decided
    assert cluster.get("dynamocheckpoint", "confirmed-late")["status"]["phase"] == "Creating"
    cluster.agent_verdict(LLAMA_JOB, "completed")
    cluster.wait_phase("confirmed-late", "Ready")


def test_agent_failure_fails_the_checkpoint(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("agent-failed"))
    cluster.wait_phase("agent-failed", "Creating")
    cluster.agent_verdict(LLAMA_JOB, "failed")
    failed = cluster.wait_phase("agent-failed", "Failed")
    assert {c["type"]: c for c in failed["status"]["conditions"]}["JobCompleted"]["reason"] == "JobFailed"


def test_agent_failure_after_completion_is_a_verification_failure(agent_mount, start_operator):
    cluster = agent_mount
    cluster.apply(checkpoint_manifest("verify-failed"))
    operator = start_operator(enabled_config())
    cluster.wait_phase("verify-failed", "Creating")
    operator.stop()  # so the Complete Job and the `failed` verdict are seen together
    cluster.run_job_to(LLAMA_JOB)
    cluster.agent_verdict(LLAMA_JOB, "failed")
    start_operator(enabled_config())
    failed = cluster.wait_phase("verify-failed", "Failed")
    assert {c["type"]: c for c in failed["status"]["conditions"]}["JobCompleted"]["reason"] == \
        "CheckpointVerificationFailed"
    cluster.wait_event("verify-failed", "CheckpointVerificationFailed")


def test_job_failure_carries_the_pods_reason(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("oom"))
    cluster.wait_phase("oom", "Creating")
    cluster.run_job_to(LLAMA_JOB, exit_code=137, reason="OOMKilled")
    failed = cluster.wait_phase("oom", "Failed")
    assert "OOMKilled (exit code 137)" in failed["status"]["message"]
    assert LLAMA_JOB in failed["status"]["message"]


def test_deleted_job_fails_the_checkpoint(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("job-deleted"))
    cluster.wait_phase("job-deleted", "Creating")
    cluster.kubectl("delete", "job", LLAMA_JOB, "-n", cluster.namespace, "--wait=false")
    failed = cluster.wait_phase("job-deleted", "Failed")
    assert {c["type"]: c for c in failed["status"]["conditions"]}["JobCompleted"]["reason"] == "JobDeleted"
    cluster.kubectl("wait", f"job/{LLAMA_JOB}", "-n", cluster.namespace, "--for=delete", "--timeout=30s")


def test_a_checkpoint_deleted_and_applied_again_waits_for_the_old_job_and_gets_its_own(agent_mount, start_operator):
    """What the guide says after a failure: delete the DynamoCheckpoint and apply it again. The deleted
    object's Job is the garbage collector's to remove, a moment later: the new object waits for that
    (Pending, saying so), it does not fail for good on a Job it does not own."""
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("again"))
    cluster.wait_phase("again", "Creating")
    cluster.kubectl("delete", "dynamocheckpoint", "again", "-n", cluster.namespace)
    cluster.apply(checkpoint_manifest("again"))
    created = cluster.wait_phase("again", "Creating")
    job = cluster.get("job", LLAMA_JOB)
    assert [ref["uid"] for ref in job["metadata"]["ownerReferences"]] == [created["metadata"]["uid"]]
    assert [e["reason"] for e in cluster.events("again") if e["reason"] == "JobOwnedByAnotherObject"] == []


def test_operator_killed_mid_flight_makes_no_second_job_and_finishes(agent_mount, start_operator):
    cluster = agent_mount
    operator = start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("restarted"))
    cluster.wait_phase("restarted", "Creating")
    job_uid = cluster.get("job", LLAMA_JOB)["metadata"]["uid"]
    operator.kill()
    cluster.run_job_to(LLAMA_JOB)
    cluster.agent_verdict(LLAMA_JOB, "completed")
    start_operator(enabled_config())
    ready = cluster.wait_phase("restarted", "Ready")
    jobs = cluster.list("jobs", "nvidia.com/snapshot-checkpoint-id")
    assert [j["metadata"]["uid"] for j in jobs] == [job_uid]
    # a decided phase stays decided, whatever happens to the Job afterwards, across another restart
    cluster.agent_verdict(LLAMA_JOB, "failed")
    start_operator(enabled_config())
    time.sleep(2)
    assert cluster.get("dynamocheckpoint", "restarted")["status"] == ready["status"]


def test_disabled_configuration_keeps_checkpoints_pending(agent_mount, start_operator):
    cluster = agent_mount
    start_operator({"checkpoint": {"enabled": False}})
    cluster.apply(checkpoint_manifest("disabled"))
    pending = cluster.wait_phase("disabled", "Pending")
    assert pending["status"]["message"] == "checkpoint functionality is disabled in the operator configuration"
    event = cluster.wait_event("disabled", "CheckpointDisabled")
    assert event["type"] == "Warning"
    assert not cluster.list("jobs")


def test_duplicate_checkpoint_id_fails_the_later_one(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("first"))
    cluster.wait_phase("first", "Creating")
    time.sleep(1.1)  # creationTimestamp has one-second resolution: make "later" unambiguous
    cluster.apply(checkpoint_manifest("second"))
    failed = cluster.wait_phase("second", "Failed")
    assert failed["status"]["message"] == f"checkpoint ID {LLAMA_ID} is already owned by first"
    assert cluster.get("dynamocheckpoint", "first")["status"]["phase"] == "Creating"
    assert len(cluster.list("jobs")) == 1


def test_agent_mount_without_agent_daemonset_fails_with_the_storage_error(cluster, start_operator):
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("no-agent"))
    failed = cluster.wait_phase("no-agent", "Failed")
    assert failed["status"]["message"] == f"no snapshot-agent daemonset found in namespace {cluster.namespace}"
    assert not cluster.list("jobs")


def test_agent_daemonset_without_pvc_volume_fails(cluster, start_operator):
    cluster.apply(agent_daemonset(pvc=None))
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("no-volume"))
    failed = cluster.wait_phase("no-volume", "Failed")
    assert "does not mount a PVC-backed checkpoint volume" in failed["status"]["message"]


def test_pod_mount_creates_the_namespace_pvc_and_recreates_it(cluster, start_operator):
    start_operator(enabled_config(accessMode="podMount", pvc={"create": True, "size": "5Gi",
                                                              "storageClassName": "fast"}))
    cluster.apply(checkpoint_manifest("podmount"))
    cluster.wait_phase("podmount", "Creating")
    pvc = cluster.get("pvc", "snapshot-pvc")
    assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] == "checkpoint-storage"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "fast" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod_spec = cluster.get("job", LLAMA_JOB)["spec"]["template"]["spec"]
    assert {"name": "checkpoint-storage", "persistentVolumeClaim": {"claimName": "snapshot-pvc"}} \
        in pod_spec["volumes"]
    assert {"name": "checkpoint-storage", "mountPath": "/checkpoints"} in pod_spec["containers"][0]["volumeMounts"]
    old_uid = pvc["metadata"]["uid"]
    cluster.kubectl("delete", "pvc", "snapshot-pvc", "-n", cluster.namespace, "--wait=false")
    # no kubelet holds it: let it go now (it may be gone already: then there is nothing to patch)
    cluster.kubectl.run("patch", "pvc", "snapshot-pvc", "-n", cluster.namespace, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}', check=False)
    eventually(lambda: (cluster.get_if_exists("pvc", "snapshot-pvc") or {"metadata": {"uid": old_uid}})
               ["metadata"]["uid"] != old_uid, what="the PVC's re-creation")


def test_pod_mount_verifies_an_existing_pvc(cluster, start_operator):
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "mine"},
                   "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    start_operator(enabled_config(accessMode="podMount", pvc={"pvcName": "mine", "basePath": "/ckpt"}))
    cluster.apply(checkpoint_manifest("existing-pvc"))
    cluster.wait_phase("existing-pvc", "Creating")
    main = cluster.get("job", LLAMA_JOB)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "checkpoint-storage", "mountPath": "/ckpt"} in main["volumeMounts"]
    assert cluster.get("job", LLAMA_JOB)["spec"]["template"]["metadata"]["annotations"][
        "nvidia.com/snapshot-storage-base-path"] == "/ckpt"


def test_pod_mount_missing_pvc_is_reported(cluster, start_operator):
    start_operator(enabled_config(accessMode="podMount"))
    cluster.apply(checkpoint_manifest("missing-pvc"))
    failed = cluster.wait_phase("missing-pvc", "Failed")
    message = (f"checkpoint storage PVC {cluster.namespace}/snapshot-pvc does not exist and "
               "checkpoint.storage.pvc.create is false")
    assert failed["status"]["message"] == message
    assert cluster.wait_event("missing-pvc", "StorageUnavailable")["note"] == message
    assert not cluster.list("jobs")


def test_missing_target_container_fails_naming_the_field(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("wrong-target", target="worker"))
    failed = cluster.wait_phase("wrong-target", "Failed")
    assert failed["status"]["message"] == (
        "spec.job.targetContainerName: no container named 'worker' in the pod template (containers: main)")
    assert not cluster.list("jobs")


def test_pod_template_the_api_server_rejects_fails_naming_the_field(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("no-image", containers=[{"name": "main"}]))
    failed = cluster.wait_phase("no-image", "Failed")
    assert "spec.template.spec.containers[0].image: Required value" in failed["status"]["message"]
    assert not cluster.list("jobs")


def test_backoff_limit_is_ignored_with_an_event(agent_mount, start_operator):
    cluster = agent_mount
    start_operator(enabled_config())
    cluster.apply(checkpoint_manifest("retries", backoffLimit=5, activeDeadlineSeconds=120, sharedMemory="1Gi"))
    cluster.wait_phase("retries", "Creating")
    job = cluster.get("job", LLAMA_JOB)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 120
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    event = cluster.wait_event("retries", "BackoffLimitIgnored")
    assert "single-attempt" in event["note"]
