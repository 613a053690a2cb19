"""Why a Job's pod failed, read from the Pod objects alone (pure: no API calls).

Shared by the operator's checkpoint outcome (controllers/checkpoint/outcome.py) and snapshotctl, so a
failed checkpoint pod is explained in the same words to both. Stages:

1. `describe_pod_failure`: the target container's termination or wait reason, else the pod's own reason.
2. `killed_container`: whether the target container was killed - by the kernel's OOM killer or by SIGKILL
   (exit code 137) - and where (pod, node, its memory limit).
3. `explain_killed_pod`: the sentence for a Job whose pod was killed before the snapshot agent recorded a
   result; the caller says where the container's memory limit is set and how to retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynamo_snapshot.api import names

SIGKILL = 9
SIGKILL_EXIT_CODE = 128 + SIGKILL  # 137: how a container runtime reports a process ended by SIGKILL


def _by_creation(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")


def _terminated(container_status: dict[str, Any]) -> dict[str, Any] | None:
    return (container_status.get("state") or {}).get("terminated") or \
        (container_status.get("lastState") or {}).get("terminated")


def describe_pod_failure(pods: list[dict[str, Any]], target: str) -> str:
    """The most useful reason a checkpoint pod gave: the target container's termination or wait reason,
    else the pod's own reason."""
    details = []
    for pod in _by_creation(pods):
        status = pod.get("status", {})
        name = pod.get("metadata", {}).get("name", "?")
        for cs in status.get("containerStatuses", []) or []:
            if cs.get("name") != target:
                continue
            terminated = _terminated(cs)
            waiting = (cs.get("state") or {}).get("waiting")
            if terminated:
                text = f"container {target} terminated: {terminated.get('reason') or 'Error'}"
                text += f" (exit code {terminated.get('exitCode')})"
                if terminated.get("message"):
                    text += f": {terminated['message'].strip()}"
                details.append(f"pod {name}: {text}")
            elif waiting and waiting.get("reason"):
                text = f"container {target} waiting: {waiting['reason']}"
                if waiting.get("message"):
                    text += f": {waiting['message'].strip()}"
                details.append(f"pod {name}: {text}")
        if status.get("reason"):
            details.append(f"pod {name}: {status['reason']}: {status.get('message', '').strip()}".rstrip(": "))
    return "; ".join(details)


@dataclass(frozen=True)
class Kill:
    """The target container of `pod` (on `node`) was killed: out of memory (`oom`), else by SIGKILL."""

    pod: str
    container: str
    node: str | None
    exit_code: int | None
    oom: bool
    memory_limit: str | None


def _memory_limit(pod: dict[str, Any], target: str) -> str | None:
    for container in pod.get("spec", {}).get("containers", []) or []:
        if container.get("name") == target:
            return ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def killed_container(pods: list[dict[str, Any]], target: str) -> Kill | None:
    """The newest pod whose target container was OOMKilled or ended by SIGKILL (exit code 137); None when
    no pod's target container ended that way (it exited on its own, or has not ended yet)."""
    for pod in reversed(_by_creation(pods)):
        for cs in pod.get("status", {}).get("containerStatuses", []) or []:
            terminated = _terminated(cs) if cs.get("name") == target else None
            if not terminated:
                continue
            oom = terminated.get("reason") == names.CONTAINER_REASON_OOM_KILLED
            if oom or terminated.get("exitCode") == SIGKILL_EXIT_CODE or terminated.get("signal") == SIGKILL:
                return Kill(pod=pod.get("metadata", {}).get("name", "?"), container=target,
                            node=pod.get("spec", {}).get("nodeName"), exit_code=terminated.get("exitCode"),
                            oom=oom, memory_limit=_memory_limit(pod, target))
    return None


def explain_killed_pod(pods: list[dict[str, Any]], target: str, *, job_failure_reason: str | None,
                       memory_limit_field: str, retry: str) -> str | None:
    """What happened to a checkpoint Job that failed with no verdict from the snapshot agent, when its pod's
    target container was killed: None when it was not (or when the Job's own deadline explains the kill).

    `memory_limit_field`: where the container's memory limit is set (named in the OOM advice);
    `retry`: how to try again, e.g. "delete and re-create DynamoCheckpoint ns/name to retry"."""
    if job_failure_reason == names.JOB_REASON_DEADLINE_EXCEEDED:
        return None  # the Job controller killed the pod on its deadline: the Job's reason says so already
    kill = killed_container(pods, target)
    if kill is None:
        return None
    nothing_stored = "nothing was promoted (no checkpoint was stored)"
    if kill.oom:
        limit = (f"raise container {kill.container}'s memory limit ({memory_limit_field}, now {kill.memory_limit})"
                 if kill.memory_limit else
                 f"container {kill.container} has no memory limit, so the node itself ran out of memory: set "
                 f"{memory_limit_field} (and the memory request) to what the model needs, on a node that has it,")
        return (f"checkpoint pod {kill.pod} ran out of memory: container {kill.container} was OOMKilled "
                f"(exit code {kill.exit_code}) before the snapshot agent recorded a result; {nothing_stored}; "
                f"{limit} and {retry}")
    node = f"node {kill.node}" if kill.node else "the pod's node"
    return (f"checkpoint pod {kill.pod} was killed (container {kill.container} exit code {kill.exit_code}, "
            f"SIGKILL) before the snapshot agent recorded a result: the snapshot agent on {node} may have died "
            f"or restarted; {nothing_stored}; {retry}")
