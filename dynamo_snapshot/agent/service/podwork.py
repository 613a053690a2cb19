"""What a pod on this node asks of the agent (SPEC section 7), decided from the pod object alone.

* A checkpoint source (labels: the checkpoint ID and ``snapshot-is-checkpoint-source=true``) whose
  target container is Ready (its readiness probe reads ``ready-for-snapshot``) is to be checkpointed,
  once, for the Job that owns it.
* A restore pod (the checkpoint-ID label, not a source), Pending or Running, is to have each target
  container restored once it runs (snapshot-init waits in standby), unless its annotations say that
  this very container was already restored, or already failed - a failed one that still runs (not
  refused for good) is to be killed again: the kill that follows the failure did not land.

Pure functions over plain dicts: the daemon feeds them from its informer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynamo_snapshot.api import names

JOB_NAME_LABEL = names.LABEL_JOB_NAME


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class _ContainerWork:
    pod: PodRef
    container: str
    container_id: str
    checkpoint_id: str
    artifact_version: str
    base_path: str | None  # where the operator says the pod mounts storage (podMount), if it says
    # the operator's storage type for this pod (pvc or s3), if it says: an agent configured otherwise refuses
    storage_type: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class CheckpointWork(_ContainerWork):
    job: str
    job_uid: str  # from the pod's controller owner reference
    container_spec: tuple[Any, ...] | None = None  # the target's (image, command, args) in the pod spec

    @property
    def key(self) -> str:
        return f"checkpoint/{self.checkpoint_id}"


@dataclass(frozen=True)
class RestoreWork(_ContainerWork):
    # Set when the annotations say this container ID's restore was started by an agent that is gone.
    interrupted: bool = False
    # The agent refused this checkpoint for this pod for good (an earlier container): the reason to tell
    # this container, which is not restored.
    refused: str | None = None
    # The target's restore fallback (pod spec env): a refused restore starts its workload cold
    falls_back_cold: bool = False
    # Annotated failed (not refused) for this very container, which still runs: the kill that should
    # have followed did not land (the runtime did not answer), so the pod would wait in standby forever
    unkilled: bool = False

    @property
    def key(self) -> str:
        return f"restore/{self.container_id}"


Work = CheckpointWork | RestoreWork


def _meta(pod: dict[str, Any]) -> dict[str, Any]:
    return pod.get("metadata") or {}


def strip_runtime(container_id: str) -> str:
    """``containerd://abc`` -> ``abc`` (the kubelet prefixes the runtime's name)."""
    return container_id.partition("://")[2] or container_id


def target_containers(pod: dict[str, Any]) -> list[str]:
    value = (_meta(pod).get("annotations") or {}).get(names.ANN_TARGET_CONTAINERS, "")
    return [name.strip() for name in value.split(",") if name.strip()]


def container_status(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == name:
            return status
    return None


def running_container_id(pod: dict[str, Any], name: str) -> str | None:
    status = container_status(pod, name)
    if not status or not status.get("containerID") or "running" not in (status.get("state") or {}):
        return None
    return strip_runtime(status["containerID"])


def _controller(obj: dict[str, Any], kind: str, api_prefix: str) -> dict[str, Any] | None:
    for ref in _meta(obj).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == kind and str(ref.get("apiVersion", "")).startswith(api_prefix):
            return ref
    return None


def owning_job(pod: dict[str, Any]) -> tuple[str, str] | None:
    """The Job that controls a source pod: (name, uid), from its controller owner reference only (a
    Job-name label anyone can set names nothing)."""
    ref = _controller(pod, "Job", "batch/")
    if ref is None or not ref.get("name") or not ref.get("uid"):
        return None
    return ref["name"], ref["uid"]


def _falls_back_cold(spec: dict[str, Any], name: str) -> bool:
    """Whether the container's env asks for a cold start when its restore is refused (pure)."""
    for container in (spec or {}).get("containers") or []:
        if isinstance(container, dict) and container.get("name") == name:
            env = container.get("env") if isinstance(container.get("env"), list) else []
            return any(isinstance(e, dict) and e.get("name") == names.ENV_RESTORE_FALLBACK
                       and str(e.get("value", "")).strip().lower() == names.RESTORE_FALLBACK_COLD for e in env)
    return False


def _container_spec(spec: dict[str, Any], name: str) -> tuple[Any, ...] | None:
    for container in (spec or {}).get("containers") or []:
        if isinstance(container, dict) and container.get("name") == name:
            return (container.get("image"), container.get("command"), container.get("args"))
    return None


def source_mismatch(work: CheckpointWork, job: dict[str, Any]) -> str | None:
    """Why the source pod of ``work`` is not the one the checkpoint Job ``job`` created (pure), or None.

    The chain: the pod's controller is this Job (uid), the Job's controller is a DynamoCheckpoint, the
    Job carries the pod's checkpoint ID, and the pod's target container runs what the Job's template
    says (image, command, args): a pod made to look like the source dumps nothing under another ID."""
    meta = _meta(job)
    if meta.get("uid") != work.job_uid:
        return f"its controller Job uid {work.job_uid} is not Job {work.job}'s ({meta.get('uid')})"
    if _controller(job, names.CHECKPOINT_KIND, f"{names.GROUP}/") is None:
        return f"Job {work.job} is not controlled by a {names.CHECKPOINT_KIND}"
    job_id = (meta.get("labels") or {}).get(names.LABEL_CHECKPOINT_ID)
    if job_id != work.checkpoint_id:
        return f"Job {work.job} is for checkpoint {job_id!r}, the pod says {work.checkpoint_id!r}"
    template = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    if _container_spec(template, work.container) != work.container_spec:
        return f"container {work.container} does not run what Job {work.job}'s template says (image, command, args)"
    return None


def _ref(pod: dict[str, Any]) -> PodRef:
    meta = _meta(pod)
    return PodRef(meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""))


def storage_type(pod: dict[str, Any]) -> str | None:
    return ((_meta(pod).get("annotations") or {}).get(names.ANN_STORAGE_TYPE)) or None


def _common(pod: dict[str, Any]) -> tuple[str, str, str | None]:
    annotations = _meta(pod).get("annotations") or {}
    return (
        (_meta(pod).get("labels") or {}).get(names.LABEL_CHECKPOINT_ID, ""),
        annotations.get(names.ANN_ARTIFACT_VERSION) or names.DEFAULT_ARTIFACT_VERSION,
        annotations.get(names.ANN_STORAGE_BASE_PATH) or None,
    )


def is_source(pod: dict[str, Any]) -> bool:
    return (_meta(pod).get("labels") or {}).get(names.LABEL_IS_CHECKPOINT_SOURCE) == "true"


def source_of(pod: dict[str, Any]) -> CheckpointWork | None:
    """The checkpoint of a source pod whatever its target's state (``container_id`` empty when the target
    does not run): what a restarted agent settles. One target per checkpoint."""
    checkpoint_id, version, base_path = _common(pod)
    targets = target_containers(pod)
    job = owning_job(pod)
    if not is_source(pod) or not checkpoint_id or len(targets) != 1 or job is None:
        return None
    return CheckpointWork(pod=_ref(pod), container=targets[0],
                          container_id=running_container_id(pod, targets[0]) or "",
                          checkpoint_id=checkpoint_id, artifact_version=version, base_path=base_path,
                          storage_type=storage_type(pod), job=job[0], job_uid=job[1],
                          container_spec=_container_spec(pod.get("spec") or {}, targets[0]))


def checkpoint_work(pod: dict[str, Any]) -> CheckpointWork | None:
    """The checkpoint a source pod asks for now, if its target is Ready."""
    work = source_of(pod)
    if work is None or not work.container_id or _meta(pod).get("deletionTimestamp"):
        return None
    status = container_status(pod, work.container)
    return work if status and status.get("ready") else None


def restore_work(pod: dict[str, Any]) -> list[RestoreWork]:
    """The restores a restore pod asks for now: one per running target container not yet handled."""
    checkpoint_id, version, base_path = _common(pod)
    phase = (pod.get("status") or {}).get("phase")
    if not checkpoint_id or phase not in ("Pending", "Running") or _meta(pod).get("deletionTimestamp"):
        return []
    annotations = _meta(pod).get("annotations") or {}
    found = []
    for container in target_containers(pod):
        container_id = running_container_id(pod, container)
        if container_id is None:
            continue
        handled = annotations.get(names.restore_container_id_annotation(container)) == container_id
        status = annotations.get(names.restore_status_annotation(container))
        refused_here = annotations.get(names.restore_refused_annotation(container)) == checkpoint_id
        unkilled = handled and status == names.STATUS_FAILED and not refused_here
        if handled and (status == names.STATUS_COMPLETED or (status == names.STATUS_FAILED and refused_here)):
            continue
        interrupted = handled and status == names.STATUS_IN_PROGRESS
        refused = None
        if refused_here:
            refused = annotations.get(names.restore_message_annotation(container)) or "refused by the agent"
        found.append(RestoreWork(pod=_ref(pod), container=container, container_id=container_id,
                                 checkpoint_id=checkpoint_id, artifact_version=version, base_path=base_path,
                                 storage_type=storage_type(pod), interrupted=interrupted, refused=refused,
                                 falls_back_cold=_falls_back_cold((pod.get("spec") or {}), container),
                                 unkilled=unkilled))
    return found


def work_for(pod: dict[str, Any]) -> list[Work]:
    if is_source(pod):
        work = checkpoint_work(pod)
        return [work] if work else []
    return list(restore_work(pod))
