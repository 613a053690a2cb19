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
