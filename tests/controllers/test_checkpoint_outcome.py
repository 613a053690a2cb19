"""The agent-confirmation table (controllers/checkpoint/outcome.py): the Job, its annotation, the agent's
Lease and the pods in; a phase and a message out. End to end in test_checkpoint_controller.py."""

import datetime as dt

import pytest

from dynamo_snapshot.api import Phase, names
from dynamo_snapshot.controllers.checkpoint.outcome import UNCONFIRMED_MESSAGE, decide

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)



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


# -- a Job that failed with no verdict from the agent: its pod was killed -------------------------------------
BACKOFF = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")


def _killed_pod(exit_code=137, reason="Error", node="gpu-node-7", memory="8Gi"):
    resources = {"limits": {"memory": memory}} if memory else {}
    return {"metadata": {"name": "checkpoint-job-x-1-abcde", "creationTimestamp": "2026-11-28T11:59:00Z"},
            "spec": {"nodeName": node, "containers": [{"name": "sidecar"}, {"name": "main", "resources": resources}]},
            "status": {"phase": "Failed", "containerStatuses": [
                {"name": "main", "state": {"terminated": {"reason": reason, "exitCode": exit_code}}}]}}


def _owned_failed_job(annotation=None, conditions=(BACKOFF,)):
    job = _job(conditions, annotation=annotation)
    job["metadata"]["namespace"] = "team-a"
    job["metadata"]["ownerReferences"] = [{"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoCheckpoint",
                                           "name": "llama", "uid": "u1", "controller": True}]
    return job


def test_a_sigkilled_pod_without_agent_verdict_says_it_was_killed_on_which_node_and_how_to_retry():
    out = decide(_owned_failed_job(), lease=None, pods=[_killed_pod()], target="main", now=NOW)
    assert (out.phase, out.reason) == (Phase.FAILED, "JobFailed")
    assert out.message == (
        "checkpoint Job checkpoint-job-x-1 failed: checkpoint pod checkpoint-job-x-1-abcde was killed "
        "(container main exit code 137, SIGKILL) before the snapshot agent recorded a result: the snapshot "
        "agent on node gpu-node-7 may have died or restarted; nothing was promoted (no checkpoint was stored); "
        "delete and re-create DynamoCheckpoint team-a/llama to retry")


def test_an_oomkilled_pod_without_agent_verdict_says_to_raise_that_containers_memory_limit():
    pod = _killed_pod(reason="OOMKilled")
    out = decide(_owned_failed_job(), lease=None, pods=[pod], target="main", now=NOW)
    assert out.phase is Phase.FAILED
    assert out.message == (
        "checkpoint Job checkpoint-job-x-1 failed: checkpoint pod checkpoint-job-x-1-abcde ran out of memory: "
        "container main was OOMKilled (exit code 137) before the snapshot agent recorded a result; nothing was "
        "promoted (no checkpoint was stored); raise container main's memory limit "
        "(spec.job.podTemplateSpec.spec.containers[main].resources.limits.memory, now 8Gi) and delete and "
        "re-create DynamoCheckpoint team-a/llama to retry")


def test_an_oomkilled_pod_without_a_memory_limit_says_the_node_ran_out_and_to_set_one():
    out = decide(_owned_failed_job(), lease=None, pods=[_killed_pod(reason="OOMKilled", memory=None)],
                 target="main", now=NOW)
    assert "container main has no memory limit, so the node itself ran out of memory" in out.message
    assert "spec.job.podTemplateSpec.spec.containers[main].resources.limits.memory" in out.message


def test_a_pod_that_exited_on_its_own_keeps_the_jobs_reason_and_the_pods():
    out = decide(_owned_failed_job(), lease=None, pods=[_killed_pod(exit_code=1)], target="main", now=NOW)
    assert out.message == (
        "checkpoint Job checkpoint-job-x-1 failed: BackoffLimitExceeded: Job has reached the specified backoff "
        "limit; pod checkpoint-job-x-1-abcde: container main terminated: Error (exit code 1)")


def test_a_pod_killed_when_the_jobs_deadline_passed_is_blamed_on_the_deadline_not_the_agent():
    deadline = ("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
    out = decide(_owned_failed_job(conditions=(deadline,)), lease=None, pods=[_killed_pod()], target="main",
                 now=NOW)
    assert "DeadlineExceeded" in out.message and "may have died" not in out.message


def test_a_killed_pod_after_the_agent_failed_the_checkpoint_keeps_the_agents_reason():
    job = _owned_failed_job(annotation="failed")
    job["metadata"]["annotations"][names.ANN_CHECKPOINT_MESSAGE] = "criu dump failed with exit code 1"
    out = decide(job, lease=None, pods=[_killed_pod()], target="main", now=NOW)
    assert out.message.startswith("snapshot-agent reported the checkpoint of Job checkpoint-job-x-1 as failed: "
                                  "criu dump failed with exit code 1")
    assert "may have died" not in out.message


def test_a_killed_sidecar_is_not_taken_for_the_checkpointed_container():
    pod = _killed_pod(exit_code=1)
    pod["status"]["containerStatuses"].append(
        {"name": "sidecar", "state": {"terminated": {"reason": "Error", "exitCode": 137}}})
    out = decide(_owned_failed_job(), lease=None, pods=[pod], target="main", now=NOW)
    assert "SIGKILL" not in out.message and "BackoffLimitExceeded" in out.message
