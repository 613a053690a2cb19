"""One checkpoint or one restore, with the agent's side of the protocol with the operator.

Checkpoint (SPEC section 4):
    the Job's verdict must not exist yet -> take the Lease named after the Job -> dump, manifest, promote
    -> annotate the Job ``completed`` -> ``snapshot-complete`` into the container (the workload exits 0,
    so the Job completes after the verdict) -> delete the Lease.
    Failure: annotate ``failed`` (and a Warning event on the Job saying why) while still holding the
    Lease, kill the workload, leave nothing promoted. Losing the Lease aborts the dump.

Restore (SPEC section 7):
    annotate the pod ``restore-status.<c>: in_progress`` and ``restore-container-id.<c>: <id>`` (so a
    restarted agent knows this container ID was taken on) -> restore -> ``restore-complete`` -> annotate
    ``completed``. A restarted agent that finds ``in_progress`` for the running container records
    ``completed`` if ``restore-complete`` is in it (only the mark was lost), else fails it as interrupted.
    Failure: annotate ``failed``, an event with the reason, and kill the placeholder so the kubelet starts
    a fresh container (a new ID) and the restore is tried again cleanly - unless no fresh container could
    do better (``refused_for_good``): then the placeholder is told ``restore-failed`` and is not killed,
    so a DGD does not crash-loop; it starts its workload cold (startupPolicy Immediate) or keeps waiting
    while the pod's annotation and the DGD's status say why (WaitForCheckpoint). A kill the runtime did not
    answer (or a look at an interrupted placeholder) is RETRY: the pod is looked at again until it lands.

Each returns an ``Outcome``; RETRY means nothing was touched and the pod may be looked at again later.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot.agent.cuda.devices import GpuMismatch
from dynamo_snapshot.agent.errors import AgentError, ArtifactInvalid, ArtifactMissing, RestoreExceedsPrivilege
from dynamo_snapshot.agent.pipeline.hooks import Hooks
from dynamo_snapshot.agent.service.lease import CheckpointLease, LeaseUnavailable
from dynamo_snapshot.agent.service.metrics import AgentMetrics
from dynamo_snapshot.agent.service.nodeops import NodeOps
from dynamo_snapshot.agent.service.podwork import CheckpointWork, PodRef, RestoreWork, source_mismatch
from dynamo_snapshot.api import names
from dynamo_snapshot.kube import JOBS, PODS, Client, EventRecorder, KubeError, NotFound

log = structlog.get_logger(__name__)

CLEANUP_TIMEOUT_S = 30.0  # for the verdict and the kill after a failure, even while the agent stops
VERDICT_ATTEMPTS = 5


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to do (decided already, the Job is gone)
    RETRY = "retry"  # the API server could not be asked, or another holder has the Lease; nothing was touched


class CheckpointAborted(AgentError):
    pass


def _describe(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text if len(text) < 900 else text[:900] + " ..."


def refused_for_good(err: BaseException) -> bool:
    """Whether a restore failure is one a fresh container of the same pod would meet again: the artifact
    altered or unauthenticated, made for another node or GPU, or asking for more privilege than the pod
    has. A manifest not (yet) on storage, CRIU failing, or an interrupted agent may pass on a retry."""
    if isinstance(err, ArtifactMissing):
        return False
    return isinstance(err, (ArtifactInvalid, RestoreExceedsPrivilege, GpuMismatch))


def _job_finished(job: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _pod_object(pod: PodRef) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid}}


@dataclass
class Operations:
    client: Client
    node: NodeOps
    recorder: EventRecorder
    identity: str
    metrics: AgentMetrics
    lease_duration_s: int = 15
    lease_renew_every: float = 3.0
    lease_renew_deadline: float = 10.0

    # -- checkpoint ------------------------------------------------------------------------------------------
    async def checkpoint(self, work: CheckpointWork, seen_ready_at: float) -> Outcome:
        bound = log.bind(namespace=work.pod.namespace, name=work.pod.name, job=work.job,
                         checkpoint_id=work.checkpoint_id, container_id=work.container_id)
        try:
            job = await self.client.get(JOBS, work.job, work.pod.namespace)
        except NotFound:
            bound.warning("checkpoint source pod's Job is gone; nothing to confirm")
            return Outcome.SKIPPED
        except KubeError as err:
            bound.warning("cannot read the checkpoint Job; will look again", error=str(err))
            return Outcome.RETRY
        if mismatch := source_mismatch(work, job):
            bound.warning("not the checkpoint Job's source pod; refused, nothing dumped", reason=mismatch)
            return Outcome.SKIPPED
        verdict = (job["metadata"].get("annotations") or {}).get(names.ANN_CHECKPOINT_STATUS)
        if verdict or _job_finished(job):
            bound.info("checkpoint already decided", verdict=verdict or "(Job finished)")
            return Outcome.SKIPPED
        lease = CheckpointLease(self.client, work.pod.namespace, work.job, work.checkpoint_id, self.identity,
                                duration_s=self.lease_duration_s, renew_every=self.lease_renew_every,
                                renew_deadline=self.lease_renew_deadline,
                                job_uid=job["metadata"].get("uid") or work.job_uid)
        try:
            await lease.acquire()
        except LeaseUnavailable as err:
            # Looked at again later, not remembered as done: when that holder is gone (its Lease expires
            # or the Job gets its verdict), this Ready pod still needs an agent; nothing else would change
            # the pod to bring it back (a restarted agent used to leave such a source Creating for good).
            bound.info("another agent is finalizing this checkpoint; will look again", reason=str(err))
            return Outcome.RETRY
        except KubeError as err:
            bound.warning("cannot take the checkpoint lease; will look again", error=str(err))
            return Outcome.RETRY

        started = time.monotonic()
        hooks = _CheckpointHooks(self, work, job, lease, seen_ready_at, bound)
        async with lease.held():
            result = None
            try:
                with lease.scope:
                    result = await self.node.checkpoint(work, hooks)
                if result is None:
                    raise CheckpointAborted(f"checkpoint aborted: {lease.lost}")
            except BaseException as err:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                    await self._checkpoint_failed(work, job, err, bound)
                if not isinstance(err, Exception):
                    raise  # the agent is stopping: the verdict is written, the stop goes on
                return Outcome.FAILED
        self.metrics.observe_stages("checkpoint", result.seconds)
        seconds = {k: round(v, 3) for k, v in result.seconds.items()}
        overhead = hooks.ready_to_criu_s
        bound.info("checkpoint completed", directory=str(result.directory), image_bytes=result.image_bytes,
                   seconds=seconds,
                   ready_to_criu_seconds=overhead, total_seconds=round(time.monotonic() - started, 3),
                   workload_notified=result.workload_notified)
        await self.recorder.normal(job, "CheckpointCompleted",
                                   f"checkpoint {work.checkpoint_id} of pod {work.pod.name} stored and verified "
                                   f"by snapshot-agent {self.identity}")
        return Outcome.COMPLETED

    async def _job_verdict(self, work: CheckpointWork, job: dict[str, Any], verdict: str, why: str = "") -> None:
        # The Job's uid as a precondition: a verdict must never land on a later Job of the same name.
        annotations = {names.ANN_CHECKPOINT_STATUS: verdict}
        if why:  # the operator shows it in the DynamoCheckpoint's status.message (_describe keeps it short)
            annotations[names.ANN_CHECKPOINT_MESSAGE] = why
        patch = {"metadata": {"uid": job["metadata"]["uid"], "annotations": annotations}}
        await self.client.patch(JOBS, work.job, patch, work.pod.namespace)

    async def _checkpoint_failed(self, work: CheckpointWork, job: dict[str, Any], err: BaseException,
                                 bound: Any) -> None:
        reason = ("the snapshot agent stopped during the checkpoint" if not isinstance(err, Exception)
                  else _describe(err))
        bound.error("checkpoint failed", error=reason)
        try:
            await self._job_verdict(work, job, names.STATUS_FAILED, reason)
        except KubeError as verdict_err:
            bound.error("could not record the failed verdict on the Job", error=str(verdict_err))
        await self.recorder.warning(job, "CheckpointFailed",
                                    f"checkpoint {work.checkpoint_id} of pod {work.pod.name} failed: {reason}")
        await self.node.kill_workload(work.container_id)

    # -- restore ---------------------------------------------------------------------------------------------
    async def restore(self, work: RestoreWork) -> Outcome:
        bound = log.bind(namespace=work.pod.namespace, name=work.pod.name, container=work.container,
                         checkpoint_id=work.checkpoint_id, container_id=work.container_id)
        if work.refused is not None:  # an earlier container of this pod was refused this checkpoint for good
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                try:
                    await self._restore_status(work, names.STATUS_FAILED, work.refused, refused=True)
                except KubeError as err:
                    bound.error("could not record the refused restore on the pod", error=str(err))
                await self._tell_refused(work, work.refused, bound)
            return Outcome.FAILED
        if work.unkilled:
            return Outcome.FAILED if await self._kill_placeholder(work, bound) else Outcome.RETRY
        if work.interrupted:
            try:
                finished = await self.node.restore_finished(work.container_id)
            except AgentError as err:  # the runtime did not answer: nothing changed, look again
                bound.warning("cannot tell whether the interrupted restore had finished; will look again",
                              error=str(err))
                return Outcome.RETRY
            if finished:  # only the `completed` mark was lost
                bound.info("the restore had finished before the agent restarted; recording it")
                await self._completed_verdict(work, bound)
                return Outcome.COMPLETED
            reason = (f"the restore of container {work.container} ({work.container_id}) was interrupted "
                      "(the snapshot agent restarted); restarting the container to try again")
            killed = False
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                killed = await self._restore_failed(work, reason, bound)
            return Outcome.FAILED if killed else Outcome.RETRY
        try:
            await self._restore_status(work, names.STATUS_IN_PROGRESS)
        except NotFound:
            return Outcome.SKIPPED
        except KubeError as err:
            bound.warning("cannot mark the restore in progress; will look again", error=str(err))
            return Outcome.RETRY
        started = time.monotonic()
        try:
            result = await self.node.restore(work)
        except BaseException as err:
            reason = ("the snapshot agent stopped during the restore" if not isinstance(err, Exception)
                      else _describe(err))
            killed = False
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                killed = await self._restore_failed(work, reason, bound, for_good=refused_for_good(err))
            if not isinstance(err, Exception):
                raise
            return Outcome.FAILED if killed else Outcome.RETRY
        await self._completed_verdict(work, bound)
        self.metrics.observe_stages("restore", {**result.seconds, **result.background_seconds})
        seconds = {k: round(v, 3) for k, v in result.seconds.items()}
        self.metrics.restores.labels(result.source).inc()
        bound.info("restore completed", workload_pid=result.workload_pid, seconds=seconds, source=result.source,
                   total_seconds=round(time.monotonic() - started, 3))
        await self.recorder.normal(_pod_object(work.pod), "Restored",
                                   f"container {work.container} restored from checkpoint {work.checkpoint_id} "
                                   f"in {sum(result.seconds.values()):.2f} s")
        return Outcome.COMPLETED

    async def _restore_status(self, work: RestoreWork, status: str, why: str | None = None,
                              refused: bool = False) -> None:
        # the reason of a failure stays on the pod after its event expired; any other status clears it
        annotations = {names.restore_status_annotation(work.container): status,
                       names.restore_message_annotation(work.container): why,
                       names.restore_container_id_annotation(work.container): work.container_id,
                       names.restore_refused_annotation(work.container): work.checkpoint_id if refused else None}
        await self.client.patch(PODS, work.pod.name, {"metadata": {"uid": work.pod.uid, "annotations": annotations}},
                                work.pod.namespace)

    async def _completed_verdict(self, work: RestoreWork, bound: Any) -> None:
        """The container is restored: say so, retrying a little (a restarted agent reading `in_progress`
        for this container ID would take the restore for interrupted)."""
        delay = 0.5
        for attempt in range(VERDICT_ATTEMPTS):
            try:
                await self._restore_status(work, names.STATUS_COMPLETED)
                return
            except NotFound:
                return
            except KubeError as err:
                bound.warning("could not mark the restore completed", error=str(err), attempt=attempt + 1)
                await anyio.sleep(delay)  # the API server is failing: back off before asking again
                delay *= 2

    async def _restore_failed(self, work: RestoreWork, reason: str, bound: Any, for_good: bool = False) -> bool:
        """Record the failure, then kill the placeholder (or tell it it is refused for good); False when the
        kill did not land, so the pod is looked at again (``unkilled``) instead of waiting in standby."""
        if for_good:
            reason += ("; the container starts its workload cold instead (its restore fallback)" if work.falls_back_cold
                       else "; the pod waits without restarting (no retry can help: take the checkpoint again, "
                            "then delete this pod)")
            await self._record_restore_failure(work, reason, bound, refused=True)
            await self._tell_refused(work, reason, bound)
            return True
        bound.error("restore failed; killing the placeholder", error=reason)
        await self._record_restore_failure(work, reason, bound)
        return await self._kill_placeholder(work, bound)

    async def _kill_placeholder(self, work: RestoreWork, bound: Any) -> bool:
        try:
            await self.node.kill_container(work.container_id)
        except (AgentError, OSError) as err:
            bound.warning("could not kill the placeholder of a failed restore; will try again", error=str(err))
            return False
        return True

    async def _tell_refused(self, work: RestoreWork, reason: str, bound: Any) -> None:
        """The placeholder learns its restore is refused (restore-failed) and is left running; one the
        pipeline had to kill (it had begun changing it) is restarted by the kubelet, clean, and that next
        container is told instead."""
        try:
            await self.node.refuse_restore(work.container_id, reason)
        except (OSError, ValueError, AgentError) as err:
            bound.warning("could not tell the placeholder its restore is refused; restarting it", error=str(err))
            await self.node.kill_container(work.container_id)
            return
        bound.error("restore refused for good", error=reason, cold_start=work.falls_back_cold)

    async def _record_restore_failure(self, work: RestoreWork, reason: str, bound: Any, refused: bool = False) -> None:
        try:
            await self._restore_status(work, names.STATUS_FAILED, reason, refused=refused)
        except KubeError as err:
            bound.error("could not record the failed restore on the pod", error=str(err))
        await self.recorder.warning(_pod_object(work.pod), "RestoreFailed",
                                    f"restore of container {work.container} from checkpoint {work.checkpoint_id} "
                                    f"failed: {reason}")


class _CheckpointHooks(Hooks):
    """What the checkpoint pipeline tells the agent: CRIU started (the ready-to-CRIU latency), and the
    confirmation, which writes the Job's verdict while the workload is still frozen."""

    def __init__(self, ops: Operations, work: CheckpointWork, job: dict[str, Any], lease: Any,
                 seen_ready_at: float, bound: Any):
        self.ops, self.work, self.job, self.lease, self.seen_ready_at, self.bound = (
            ops, work, job, lease, seen_ready_at, bound)
        self.ready_to_criu_s: float | None = None

    async def dump_started(self, pid: int) -> None:
        if self.ready_to_criu_s is not None:
            return
        self.ready_to_criu_s = round(time.monotonic() - self.seen_ready_at, 3)
        self.ops.metrics.checkpoint_start_latency.observe(time.monotonic() - self.seen_ready_at)
        self.bound.info("checkpoint dump started", seconds_since_ready=self.ready_to_criu_s)

    async def confirm(self, directory: Path) -> None:
        if self.lease.lost:
            raise CheckpointAborted(self.lease.lost)
        await self.ops._job_verdict(self.work, self.job, names.STATUS_COMPLETED)
