"""What a restarted agent settles of the checkpoints its predecessor on this node was killed in.

The mark is the predecessor's Lease: held by this node's identity (``snapshot-agent-<node>``), named
after the checkpoint Job, and deleted only after the release - so a Lease this agent holds when it
starts is a checkpoint that was cut short. Once the pods informer has synced and before any new work is
taken, each source pod of this node whose Job has such a Lease is settled by the Job's verdict and by
what is left of its workload (the checkpoint guard has done its part by then):

    verdict completed   the guard kept the workload, thawed: thaw (no guard survives an agent pod's
                        death), GPU state back, ``snapshot-complete`` (the workload exits 0, the Job
                        completes, the checkpoint goes Ready)
    verdict failed      the failure path may not have ended: the workload is killed
    none, untouched     cut short before anything was frozen or locked: the Ready pod is taken up again
                        as a fresh attempt
    none, otherwise     the dump had begun (or the verdict never landed): the workload is killed, as its
                        guard does, and the verdict ``failed`` says what happened, so the checkpoint
                        neither waits out the Lease nor says only "exit code 137"

then the Lease is deleted (only the version read: one someone took meanwhile is left alone).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog

from dynamo_snapshot.agent.errors import AgentError
from dynamo_snapshot.agent.pipeline.checkpoint import Settled
from dynamo_snapshot.agent.service import podwork
from dynamo_snapshot.agent.service.operations import Operations
from dynamo_snapshot.api import names
from dynamo_snapshot.kube import JOBS, LEASES, Conflict, KubeError, NotFound

log = structlog.get_logger(__name__)


def killed_message(identity: str) -> str:
    return (f"the snapshot agent ({identity}) was killed during this checkpoint, before it was confirmed: the "
            "workload was stopped and no version was confirmed. Delete the DynamoCheckpoint and apply it again "
            "to retry")


async def settle(ops: Operations, pods: Iterable[dict[str, Any]]) -> int:
    """Settle every checkpoint of ``pods`` that this node's previous agent left; how many were."""
    settled = 0
    seen: set[tuple[str, str]] = set()
    for pod in pods:
        work = podwork.source_of(pod)
        if work is None or (work.pod.namespace, work.job) in seen:
            continue
        seen.add((work.pod.namespace, work.job))
        try:
            lease = await ops.client.get(LEASES, work.job, work.pod.namespace)
        except NotFound:
            continue
        except KubeError as err:
            log.warning("cannot read a checkpoint Lease; left for its expiry", namespace=work.pod.namespace,
                        name=work.job, error=str(err))
            continue
        if (lease.get("spec") or {}).get("holderIdentity") != ops.identity:
            continue
        try:
            await _settle_one(ops, work)
        except (KubeError, AgentError, OSError) as err:
            log.error("could not settle a checkpoint the previous agent left", namespace=work.pod.namespace,
                      name=work.pod.name, job=work.job, checkpoint_id=work.checkpoint_id, error=str(err))
        await _delete(ops, lease)
        settled += 1
    return settled


async def _settle_one(ops: Operations, work: podwork.CheckpointWork) -> None:
    bound = log.bind(namespace=work.pod.namespace, name=work.pod.name, job=work.job,
                     checkpoint_id=work.checkpoint_id, container_id=work.container_id or None)
    try:
        job = await ops.client.get(JOBS, work.job, work.pod.namespace)
    except NotFound:
        bound.info("the checkpoint Job the previous agent left is gone; only its Lease to delete")
        return
    if mismatch := podwork.source_mismatch(work, job):
        bound.warning("not the checkpoint Job's source pod; left alone", reason=mismatch)
        return
    verdict = (job["metadata"].get("annotations") or {}).get(names.ANN_CHECKPOINT_STATUS)
    if verdict == names.STATUS_FAILED:
        if work.container_id:
            await ops.node.kill_workload(work.container_id)
        bound.info("settled a checkpoint the previous agent failed: its workload is killed")
        return
    settled = await ops.node.settle_source(work, completed=verdict == names.STATUS_COMPLETED)
    bound.info("settled a checkpoint the previous agent left", verdict=verdict or "(none)", source=settled.value)
    if verdict == names.STATUS_COMPLETED or settled is Settled.UNTOUCHED:
        return  # Ready once the workload exits; or a fresh attempt takes the Ready pod up again
    why = killed_message(ops.identity)
    await ops._job_verdict(work, job, names.STATUS_FAILED, why)
    await ops.recorder.warning(job, "CheckpointFailed", f"checkpoint {work.checkpoint_id} of pod {work.pod.name} "
                                                        f"failed: {why}")
    bound.error("settled a checkpoint the previous agent was killed in", error=why)


async def _delete(ops: Operations, lease: dict[str, Any]) -> None:
    metadata = lease["metadata"]
    preconditions = {"uid": metadata.get("uid", ""), "resourceVersion": metadata.get("resourceVersion", "")}
    try:
        await ops.client.delete(LEASES, metadata["name"], metadata.get("namespace"), preconditions=preconditions)
        log.info("deleted the Lease the previous agent left", namespace=metadata.get("namespace"),
                 name=metadata["name"])
    except (NotFound, Conflict):
        pass
    except KubeError as err:
        log.warning("could not delete the Lease the previous agent left", namespace=metadata.get("namespace"),
                    name=metadata["name"], error=str(err))
