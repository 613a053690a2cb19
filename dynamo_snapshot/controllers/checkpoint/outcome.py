"""What a checkpoint Job means for its DynamoCheckpoint: the agent-confirmation table of SPEC section 4.

Completion is confirmed by the snapshot agent, never by the Job alone: the agent annotates the Job
`completed` or `failed`, and holds a Lease named after the Job while it finalizes. A Job that failed with
no verdict says why: a pod killed by SIGKILL or out of memory is explained (kube/podfailure.py, the words
snapshotctl uses too), with what was stored (nothing) and how to retry.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from dynamo_snapshot.api import Phase, names
from dynamo_snapshot.kube.podfailure import describe_pod_failure, explain_killed_pod

LEASE_RECHECK_SECONDS = 1.0

REASON_READY = "CheckpointReady"
REASON_JOB_FAILED = "JobFailed"
REASON_VERIFICATION_FAILED = "CheckpointVerificationFailed"
REASON_UNCONFIRMED = "AgentConfirmationMissing"
REASON_JOB_DELETED = "JobDeleted"
REASON_WAITING_FOR_AGENT = "WaitingForAgent"
REASON_JOB_RUNNING = "JobRunning"

UNCONFIRMED_MESSAGE = "completed without snapshot-agent completion confirmation"


@dataclass(frozen=True)
class Outcome:
    """`phase` None: nothing decided yet (keep Creating, maybe recheck after `requeue_after`)."""

    phase: Phase | None
    reason: str
    message: str
    requeue_after: float | None = None


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in job.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return condition
    return None


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def seconds_since(value: str | None, now: dt.datetime) -> float:
    moment = _parse_time(value)
    return (now - moment).total_seconds() if moment else float("inf")


def lease_remaining(lease: dict[str, Any] | None, now: dt.datetime) -> float:
    """Seconds until the Lease expires; 0 when absent, released or expired."""
    if not lease:
        return 0.0
    spec = lease.get("spec", {})
    renewed = _parse_time(spec.get("renewTime")) or _parse_time(spec.get("acquireTime"))
    if not spec.get("holderIdentity") or renewed is None:
        return 0.0
    expires = renewed + dt.timedelta(seconds=spec.get("leaseDurationSeconds") or 0)
    return max(0.0, (expires - now).total_seconds())


def _retry(job: dict[str, Any]) -> str:
    """How to try again: re-create the DynamoCheckpoint that owns the Job (a Job runs once)."""
    meta = job.get("metadata", {})
    owner = next((ref["name"] for ref in meta.get("ownerReferences", []) or []
                  if ref.get("kind") == names.CHECKPOINT_KIND and ref.get("name")), None)
    if owner is None:
        return "delete and re-create the DynamoCheckpoint to retry"
    namespace = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"delete and re-create DynamoCheckpoint {namespace}{owner} to retry"


def _job_failed_message(job: dict[str, Any], failed: dict[str, Any], pods: list[dict[str, Any]],
                        target: str, *, agent_recorded: bool) -> str:
    """The Job failed (and the agent did not fail it): a pod killed (SIGKILL, OOM) before the agent recorded a
    result is said in so many words, anything else as the Job's reason plus the pod's."""
    message = f"checkpoint Job {job['metadata']['name']} failed: "
    killed = None if agent_recorded else explain_killed_pod(
        pods, target, job_failure_reason=failed.get("reason"), retry=_retry(job),
        memory_limit_field=f"spec.job.podTemplateSpec.spec.containers[{target}].resources.limits.memory")
    if killed:
        return message + killed
    message += failed.get("reason", "Failed")
    if failed.get("message"):
        message += f": {failed['message']}"
    pod_detail = describe_pod_failure(pods, target)
    return f"{message}; {pod_detail}" if pod_detail else message


def decide(
    job: dict[str, Any],
    *,
    lease: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    target: str,
    now: dt.datetime,
) -> Outcome:
    name = job["metadata"]["name"]
    verdict = job.get("metadata", {}).get("annotations", {}).get(names.ANN_CHECKPOINT_STATUS)
    complete = job_condition(job, names.JOB_COMPLETE)
    failed = job_condition(job, names.JOB_FAILED)

    if verdict == names.STATUS_FAILED:
        reason = REASON_VERIFICATION_FAILED if complete else REASON_JOB_FAILED
        message = f"snapshot-agent reported the checkpoint of Job {name} as failed"
        if why := job.get("metadata", {}).get("annotations", {}).get(names.ANN_CHECKPOINT_MESSAGE):
            message += f": {why}"
        pod_detail = describe_pod_failure(pods, target)
        return Outcome(Phase.FAILED, reason, f"{message}: {pod_detail}" if pod_detail else message)
    if failed:
        return Outcome(Phase.FAILED, REASON_JOB_FAILED, _job_failed_message(
            job, failed, pods, target, agent_recorded=verdict == names.STATUS_COMPLETED))
    if complete:
        if verdict == names.STATUS_COMPLETED:
            return Outcome(Phase.READY, REASON_READY, f"checkpoint confirmed by snapshot-agent (Job {name})")
        remaining = lease_remaining(lease, now)
        if remaining > 0:
            return Outcome(None, REASON_WAITING_FOR_AGENT,
                           f"Job {name} completed; waiting for snapshot-agent to finish the checkpoint",
                           requeue_after=min(LEASE_RECHECK_SECONDS, remaining))
        return Outcome(Phase.FAILED, REASON_UNCONFIRMED, UNCONFIRMED_MESSAGE)
    return Outcome(None, REASON_JOB_RUNNING, f"checkpoint Job {name} is running")
