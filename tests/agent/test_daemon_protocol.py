"""The agent daemon's protocol with the operator (SPEC sections 4 and 7), against the real API server.

The agent runs in-process with a fake node (no container runtime): the test plays the kubelet (pod
status) and checks what the agent writes - the Job verdict, the Lease, the restore annotations, events -
and in which order relative to the node's steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry

from dynamo_snapshot.agent.container.runtime import CRIError
from dynamo_snapshot.agent.errors import ArtifactInvalid, CriuFailed, RestoreError
from dynamo_snapshot.agent.pipeline.checkpoint import CheckpointResult, Settled
from dynamo_snapshot.agent.pipeline.restore import RestoreResult
from dynamo_snapshot.agent.service import main
from dynamo_snapshot.agent.service.daemon import Agent
from dynamo_snapshot.agent.service.metrics import AgentMetrics
from dynamo_snapshot.agent.service.operations import Operations, Outcome
from dynamo_snapshot.agent.service.podwork import CheckpointWork, RestoreWork, Work
from dynamo_snapshot.api import names
from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    EVENTS_V1,
    JOBS,
    LEASES,
    PODS,
    Client,
    EventRecorder,
    InformerFactory,
    NotFound,
    Resource,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

NODE = "agent-test-node"
IDENTITY = "snapshot-agent-test"
CHECKPOINT_ID = "0123456789abcdef"


class FakeNode:
    """The node side, scripted per test; records what the agent asked of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.checkpoint_step: Callable[..., Any] | None = None
        self.restore_step: Callable[..., Any] | None = None
        self.restored: set[str] = set()  # containers whose control directory holds restore-complete
        self.left_source = Settled.UNTOUCHED  # what settle_source finds of a source without a verdict
        self.runtime_silent: list[str] = []  # calls that fail once each, as a busy containerd's do

    async def checkpoint(self, work: CheckpointWork, hooks) -> CheckpointResult:
        self.calls.append(("checkpoint", work.container_id))
        assert self.checkpoint_step is not None
        return await self.checkpoint_step(work, hooks)

    async def restore(self, work: RestoreWork) -> RestoreResult:
        self.calls.append(("restore", work.container_id))
        assert self.restore_step is not None
        return await self.restore_step(work)

    def _ask_runtime(self, call: str, container_id: str) -> None:
        if call in self.runtime_silent:
            self.runtime_silent.remove(call)
            self.calls.append((f"{call}-unanswered", container_id))
            raise CRIError("ContainerStatus", f"container {container_id}", "deadline exceeded")

    async def restore_finished(self, container_id: str) -> bool:
        self._ask_runtime("restore-finished", container_id)
        return container_id in self.restored

    async def kill_workload(self, container_id: str) -> None:
        self.calls.append(("kill-workload", container_id))

    async def settle_source(self, work: CheckpointWork, completed: bool) -> Settled:
        self.calls.append(("settle-released" if completed else "settle", work.container_id))
        if not work.container_id:
            return Settled.GONE
        return Settled.RELEASED if completed else self.left_source

    async def kill_container(self, container_id: str) -> None:
        self._ask_runtime("kill-container", container_id)
        self.calls.append(("kill-container", container_id))

    async def refuse_restore(self, container_id: str, reason: str) -> None:
        self.calls.append(("refuse-restore", container_id))


def checkpoint_result() -> CheckpointResult:
    return CheckpointResult(directory=Path("/checkpoints/x/versions/1"), manifest={}, seconds={"dump": 0.1},
                            workload_notified=True)


def restore_result() -> RestoreResult:
    return RestoreResult(workload_pid=1000, host_pid=1, manifest={}, log_path=Path("/x/restore.log"),
                         seconds={"criu": 0.1}, background_seconds={"prefetch-pages": 0.2})


class Harness:
    def __init__(self, client: Client, namespace: str, node: FakeNode):
        self.client = client
        self.namespace = namespace
        self.node = node
        self.registry = CollectorRegistry()  # the agent's metrics, this test's alone
        self.outcomes: list[tuple[Work, Outcome]] = []
        self._changed = anyio.Event()

    def record(self, work: Work, outcome: Outcome) -> None:
        self.outcomes.append((work, outcome))
        self._changed.set()
        self._changed = anyio.Event()

    async def outcome_for(self, container_id: str, within_s: float = 30, *, not_: Outcome | None = None) -> Outcome:
        """The first outcome for the container (with ``not_``: the first other than that one)."""
        with anyio.fail_after(within_s):
            while True:
                for work, outcome in self.outcomes:
                    if work.container_id == container_id and outcome is not not_:
                        return outcome
                await self._changed.wait()

    @contextlib.asynccontextmanager
    async def agent(self, *, drain_timeout: float = 30.0, **lease: Any) -> AsyncIterator[Agent]:
        operations = Operations(self.client, self.node,
                                EventRecorder(self.client, controller="nvidia.com/snapshot-agent", instance=IDENTITY),
                                IDENTITY, AgentMetrics(self.registry), **lease)
        agent = Agent(InformerFactory(self.client), operations, node_name=NODE, namespace=self.namespace,
                      drain_timeout=drain_timeout, on_outcome=self.record)
        async with anyio.create_task_group() as tg:
            await tg.start(agent.run)
            yield agent
            tg.cancel_scope.cancel()

    # -- objects ------------------------------------------------------------------------------------------
    async def job(self, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """A checkpoint Job as the operator makes it: controlled by a DynamoCheckpoint."""
        ckpt = await self.client.create(DYNAMO_CHECKPOINTS, {
            "apiVersion": names.API_VERSION, "kind": names.CHECKPOINT_KIND, "metadata": {"name": f"{name}-ckpt"},
            "spec": {"identity": {"model": "m", "backendFramework": "vllm"}, "job": {
                "targetContainerName": "main", "podTemplateSpec": {"spec": {"containers": [
                    {"name": "main", "image": "placeholder:1"}]}}}}}, self.namespace)
        owner = {"apiVersion": names.API_VERSION, "kind": names.CHECKPOINT_KIND, "name": ckpt["metadata"]["name"],
                 "uid": ckpt["metadata"]["uid"], "controller": True}
        body = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "labels": {names.LABEL_CHECKPOINT_ID: CHECKPOINT_ID},
                             "annotations": annotations or {}, "ownerReferences": [owner]},
                "spec": {"suspend": True, "backoffLimit": 0, "template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "main", "image": "placeholder:1"}]}}}}
        return await self.client.create(JOBS, body, self.namespace)

    async def pod(self, name: str, container_id: str, *, source_of: dict[str, Any] | None = None,
                  annotations: dict[str, str] | None = None, ready: bool = True, image: str = "placeholder:1",
                  owned: bool = True, env: dict[str, str] | None = None) -> dict[str, Any]:
        """A pod on the agent's node whose container `main` runs as `container_id` (the kubelet's part)."""
        labels = {names.LABEL_CHECKPOINT_ID: CHECKPOINT_ID}
        metadata: dict[str, Any] = {"name": name, "labels": labels,
                                    "annotations": {names.ANN_TARGET_CONTAINERS: "main", **(annotations or {})}}
        if source_of is not None:
            labels[names.LABEL_IS_CHECKPOINT_SOURCE] = "true"
            job = source_of["metadata"]
            if owned:
                metadata["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": job["name"],
                                                "uid": job["uid"], "controller": True}]
            else:  # what anyone who can create pods can write
                labels["batch.kubernetes.io/job-name"] = job["name"]
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {"nodeName": NODE, "restartPolicy": "Never" if source_of else "Always",
                         "containers": [{"name": "main", "image": image,
                                         "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}]}}
        created = await self.client.create(PODS, body, self.namespace)
        status = {"phase": "Running", "containerStatuses": [{
            "name": "main", "image": "placeholder:1", "imageID": "", "ready": ready, "started": True,
            "restartCount": 0, "containerID": f"containerd://{container_id}",
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}
        await self.client.patch_status(PODS, name, {"status": status}, self.namespace)
        return created

    async def lease_of(self, job: dict[str, Any], holder: str = IDENTITY) -> dict[str, Any]:
        """The Lease a killed agent of this node left on ``job`` (live for ten more minutes)."""
        return await self.client.create(LEASES, {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": job["metadata"]["name"], "labels": {names.LABEL_CHECKPOINT_ID: CHECKPOINT_ID}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 600,
                     "renewTime": "2099-01-01T00:00:00.000000Z"}}, self.namespace)

    async def end_container(self, name: str, container_id: str, exit_code: int = 137) -> None:
        """What the kubelet reports once a source's container was killed."""
        status = {"phase": "Failed", "containerStatuses": [{
            "name": "main", "image": "placeholder:1", "imageID": "", "ready": False, "started": False,
            "restartCount": 0, "containerID": f"containerd://{container_id}",
            "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]}
        await self.client.patch_status(PODS, name, {"status": status}, self.namespace)

    async def restart_container(self, name: str, container_id: str) -> None:
        """What the kubelet does after a container was killed: the pod runs a new container ID."""
        status = {"containerStatuses": [{
            "name": "main", "image": "placeholder:1", "imageID": "", "ready": False, "started": True,
            "restartCount": 1, "containerID": f"containerd://{container_id}",
            "state": {"running": {"startedAt": "2026-01-01T00:01:00Z"}}}]}
        await self.client.patch_status(PODS, name, {"status": status}, self.namespace)

    async def annotations(self, resource: Resource, name: str) -> dict[str, str]:
        obj = await self.client.get(resource, name, self.namespace)
        return obj["metadata"].get("annotations") or {}

    async def events(self, name: str) -> list[dict[str, Any]]:
        """The agent's events about `name`."""
        listed = await self.client.list(EVENTS_V1, self.namespace)
        return [e for e in listed.items if e.get("regarding", {}).get("name") == name
                and e.get("reportingController") == "nvidia.com/snapshot-agent"]

    async def lease(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.client.get(LEASES, name, self.namespace)
        except NotFound:
            return None


@pytest.fixture
def harness(client, namespace) -> Harness:
    return Harness(client, namespace, FakeNode())


# -- checkpoints ---------------------------------------------------------------------------------------------
async def test_checkpoint_verdict_comes_after_the_dump_and_before_the_workload_is_told(harness):
    job = await harness.job("checkpoint-job-ok-1")
    seen: dict[str, Any] = {}

    async def step(work, hooks):
        seen["lease"] = await harness.lease(job["metadata"]["name"])
        seen["verdict before confirm"] = (await harness.annotations(JOBS, work.job)).get(names.ANN_CHECKPOINT_STATUS)
        await hooks.dump_started(4242)
        await hooks.confirm(Path("/checkpoints/x/versions/1"))
        # What follows in the real pipeline is snapshot-complete: the verdict must be there already.
        seen["verdict before snapshot-complete"] = (await harness.annotations(JOBS, work.job))[
            names.ANN_CHECKPOINT_STATUS]
        return checkpoint_result()

    harness.node.checkpoint_step = step
    async with harness.agent():
        await harness.pod("source", "c-ok", source_of=job)
        assert await harness.outcome_for("c-ok") is Outcome.COMPLETED

    lease = seen["lease"]
    assert lease["metadata"]["labels"][names.LABEL_CHECKPOINT_ID] == CHECKPOINT_ID  # what the operator watches
    assert lease["spec"]["holderIdentity"] == IDENTITY and lease["spec"]["leaseDurationSeconds"] == 15
    # owned by the Job: a Lease left by an agent killed before it could delete it goes with the Job
    assert lease["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job",
                                                     "name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}]
    assert seen["verdict before confirm"] is None
    assert seen["verdict before snapshot-complete"] == names.STATUS_COMPLETED
    assert await harness.lease(job["metadata"]["name"]) is None  # released once done
    assert harness.node.calls == [("checkpoint", "c-ok")]
    assert [e["reason"] for e in await harness.events(job["metadata"]["name"])] == ["CheckpointCompleted"]


async def test_a_failed_dump_is_reported_on_the_job_and_the_workload_killed(harness):
    job = await harness.job("checkpoint-job-bad-1")

    async def step(work, hooks):
        await hooks.dump_started(4242)
        raise CriuFailed("dump", 1, "Error (criu/files-ext.c:96): Can't dump file 7 of that type [1] (anon_inode)",
                         None)

    harness.node.checkpoint_step = step
    async with harness.agent():
        await harness.pod("source", "c-bad", source_of=job)
        assert await harness.outcome_for("c-bad") is Outcome.FAILED

    annotations = await harness.annotations(JOBS, job["metadata"]["name"])
    assert annotations[names.ANN_CHECKPOINT_STATUS] == "failed"
    assert "anon_inode" in annotations[names.ANN_CHECKPOINT_MESSAGE]  # for the DynamoCheckpoint's status
    assert harness.node.calls == [("checkpoint", "c-bad"), ("kill-workload", "c-bad")]
    (event,) = await harness.events(job["metadata"]["name"])
    assert event["reason"] == "CheckpointFailed" and event["type"] == "Warning"
    assert "criu dump failed" in event["note"] and "anon_inode" in event["note"]
    assert await harness.lease(job["metadata"]["name"]) is None


async def test_losing_the_lease_aborts_the_dump(harness):
    job = await harness.job("checkpoint-job-lost-1")
    dumping, cancelled = anyio.Event(), anyio.Event()

    async def step(work, hooks):
        dumping.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    harness.node.checkpoint_step = step
    async with harness.agent(lease_duration_s=4, lease_renew_every=0.3, lease_renew_deadline=2.0):
        await harness.pod("source", "c-lost", source_of=job)
        with anyio.fail_after(30):
            await dumping.wait()
        lease = await harness.lease(job["metadata"]["name"])
        lease["spec"]["holderIdentity"] = "someone-else"  # another holder takes it over
        await harness.client.update(LEASES, lease, harness.namespace)
        assert await harness.outcome_for("c-lost") is Outcome.FAILED
    assert cancelled.is_set()
    assert (await harness.annotations(JOBS, job["metadata"]["name"]))[names.ANN_CHECKPOINT_STATUS] == "failed"
    assert ("kill-workload", "c-lost") in harness.node.calls
    (event,) = await harness.events(job["metadata"]["name"])
    assert "lease" in event["note"].lower()
    # The Lease is someone else's now: left alone.
    assert (await harness.lease(job["metadata"]["name"]))["spec"]["holderIdentity"] == "someone-else"


async def test_a_decided_job_or_a_live_lease_of_another_agent_is_left_alone(harness):
    decided = await harness.job("checkpoint-job-decided-1", {names.ANN_CHECKPOINT_STATUS: "completed"})
    held = await harness.job("checkpoint-job-held-1")
    await harness.client.create(LEASES, {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "checkpoint-job-held-1", "labels": {names.LABEL_CHECKPOINT_ID: CHECKPOINT_ID}},
        "spec": {"holderIdentity": "another-agent", "leaseDurationSeconds": 600,
                 "renewTime": "2099-01-01T00:00:00.000000Z"}}, harness.namespace)
    async with harness.agent():
        await harness.pod("decided", "c-decided", source_of=decided)
        await harness.pod("held", "c-held", source_of=held)
        assert await harness.outcome_for("c-decided") is Outcome.SKIPPED
        assert await harness.outcome_for("c-held") is Outcome.RETRY  # looked at again until the holder is gone
    assert harness.node.calls == []
    assert names.ANN_CHECKPOINT_STATUS not in await harness.annotations(JOBS, "checkpoint-job-held-1")


async def test_a_restarted_agent_takes_over_its_own_nodes_live_lease_at_once(harness):
    """The agent's identity is its node's: the Lease its killed predecessor left (live for 10 more minutes)
    is recognised as its own, not waited out."""
    assert main.agent_identity("vm") == main.agent_identity("vm") == "snapshot-agent-vm"
    job = await harness.job("checkpoint-job-mine-1")
    await harness.client.create(LEASES, {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "checkpoint-job-mine-1", "labels": {names.LABEL_CHECKPOINT_ID: CHECKPOINT_ID}},
        "spec": {"holderIdentity": IDENTITY, "leaseDurationSeconds": 600,
                 "renewTime": "2099-01-01T00:00:00.000000Z"}}, harness.namespace)

    async def step(work, hooks):
        await hooks.confirm(Path("/x"))
        return checkpoint_result()

    harness.node.checkpoint_step = step
    async with harness.agent():
        await harness.pod("mine", "c-mine", source_of=job)
        assert await harness.outcome_for("c-mine") is Outcome.COMPLETED
    assert (await harness.annotations(JOBS, "checkpoint-job-mine-1"))[names.ANN_CHECKPOINT_STATUS] == "completed"
    assert await harness.lease("checkpoint-job-mine-1") is None


async def test_a_restarted_agent_finishes_the_release_its_predecessor_was_killed_in(harness):
    """Killed after the verdict and before the release: the source (kept by its guard, not Ready while it
    was frozen) gets its GPU state back and snapshot-complete, and the Lease goes."""
    job = await harness.job("checkpoint-job-release-1", {names.ANN_CHECKPOINT_STATUS: "completed"})
    await harness.lease_of(job)
    await harness.pod("released", "c-released", source_of=job, ready=False)
    async with harness.agent():  # started: what the previous agent left is settled before any new work
        assert await harness.lease("checkpoint-job-release-1") is None
    assert harness.node.calls == [("settle-released", "c-released")]
    assert (await harness.annotations(JOBS, "checkpoint-job-release-1"))[names.ANN_CHECKPOINT_STATUS] == "completed"


@pytest.mark.parametrize("left", ["gone", "killed"])
async def test_a_checkpoint_the_previous_agent_was_killed_in_goes_failed_saying_so(harness, left):
    job = await harness.job(f"checkpoint-job-cut-{left}")
    await harness.lease_of(job)
    await harness.pod("cut", "c-cut", source_of=job)
    if left == "gone":  # its guard killed the workload and the container ended
        await harness.end_container("cut", "c-cut")
    else:  # no guard survived (an agent pod's processes die with it): the dump had begun on the workload
        harness.node.left_source = Settled.KILLED
    async with harness.agent():  # started: what the previous agent left is settled before any new work
        assert await harness.lease(f"checkpoint-job-cut-{left}") is None
    annotations = await harness.annotations(JOBS, f"checkpoint-job-cut-{left}")
    assert annotations[names.ANN_CHECKPOINT_STATUS] == "failed"
    assert f"the snapshot agent ({IDENTITY}) was killed during this checkpoint" in annotations[
        names.ANN_CHECKPOINT_MESSAGE]
    assert "apply it again" in annotations[names.ANN_CHECKPOINT_MESSAGE]
    assert [e["reason"] for e in await harness.events(f"checkpoint-job-cut-{left}")] == ["CheckpointFailed"]
    assert harness.node.calls[0] == ("settle", "" if left == "gone" else "c-cut")
    assert ("checkpoint", "c-cut") not in harness.node.calls  # decided: not dumped again


async def test_an_untouched_source_the_previous_agent_left_is_checkpointed_afresh(harness):
    job = await harness.job("checkpoint-job-afresh-1")
    await harness.lease_of(job)

    async def step(work, hooks):
        await hooks.confirm(Path("/x"))
        return checkpoint_result()

    harness.node.checkpoint_step = step
    await harness.pod("afresh", "c-afresh", source_of=job)
    async with harness.agent():
        assert await harness.outcome_for("c-afresh") is Outcome.COMPLETED
    assert harness.node.calls == [("settle", "c-afresh"), ("checkpoint", "c-afresh")]
    assert (await harness.annotations(JOBS, "checkpoint-job-afresh-1"))[names.ANN_CHECKPOINT_STATUS] == "completed"
    assert await harness.lease("checkpoint-job-afresh-1") is None


async def test_another_agents_lease_is_not_settled_by_a_restarted_agent(harness):
    job = await harness.job("checkpoint-job-theirs-1", {names.ANN_CHECKPOINT_STATUS: "completed"})
    await harness.lease_of(job, holder="snapshot-agent-other-node")
    await harness.pod("theirs", "c-theirs", source_of=job, ready=False)
    async with harness.agent():
        await anyio.lowlevel.checkpoint()  # started: the settling is done before the agent takes work
    assert harness.node.calls == []
    assert (await harness.lease("checkpoint-job-theirs-1"))["spec"]["holderIdentity"] == "snapshot-agent-other-node"


async def test_a_source_pod_is_checkpointed_once_its_target_turns_ready(harness):
    job = await harness.job("checkpoint-job-late-1")

    async def step(work, hooks):
        await hooks.confirm(Path("/x"))
        return checkpoint_result()

    harness.node.checkpoint_step = step
    async with harness.agent():
        await harness.pod("late", "c-late", source_of=job, ready=False)
        pod = await harness.client.get(PODS, "late", harness.namespace)
        pod["status"]["containerStatuses"][0]["ready"] = True  # ready-for-snapshot appeared
        await harness.client.patch_status(PODS, "late", {"status": pod["status"]}, harness.namespace)
        assert await harness.outcome_for("c-late") is Outcome.COMPLETED


async def test_a_pod_posing_as_the_checkpoint_source_is_not_dumped_and_the_job_not_decided(harness):
    job = await harness.job("checkpoint-job-victim-1")
    async with harness.agent():
        await harness.pod("labelled", "c-labelled", source_of=job, owned=False)
        await harness.pod("other-image", "c-other", source_of=job, image="attacker:1")
        assert await harness.outcome_for("c-other") is Outcome.SKIPPED
    assert harness.node.calls == []
    assert names.ANN_CHECKPOINT_STATUS not in await harness.annotations(JOBS, "checkpoint-job-victim-1")
    assert not [w for w, _ in harness.outcomes if w.container_id == "c-labelled"]  # a label names no Job


# -- restores ------------------------------------------------------------------------------------------------
async def test_restore_annotations_say_in_progress_then_completed(harness):
    seen: dict[str, Any] = {}

    async def step(work):
        seen["during"] = await harness.annotations(PODS, work.pod.name)
        return restore_result()

    harness.node.restore_step = step
    async with harness.agent():
        await harness.pod("restore", "c-restore")
        assert await harness.outcome_for("c-restore") is Outcome.COMPLETED
    during = seen["during"]
    assert during[names.restore_status_annotation("main")] == "in_progress"
    assert during[names.restore_container_id_annotation("main")] == "c-restore"
    after = await harness.annotations(PODS, "restore")
    assert after[names.restore_status_annotation("main")] == "completed"
    assert names.restore_message_annotation("main") not in after
    assert after[names.restore_container_id_annotation("main")] == "c-restore"
    assert [e["reason"] for e in await harness.events("restore")] == ["Restored"]
    # where a restore's time went, for the node's dashboards
    for stage, seconds in (("criu", 0.1), ("prefetch-pages", 0.2)):
        labels = {"operation": "restore", "stage": stage}
        assert harness.registry.get_sample_value("snapshot_agent_stage_duration_seconds_sum", labels) >= seconds


async def test_a_failed_restore_is_annotated_with_the_reason_and_the_placeholder_killed(harness):
    async def step(work):
        raise RestoreError(f"/checkpoints/{CHECKPOINT_ID}/versions/1/manifest.json is missing")

    harness.node.restore_step = step
    async with harness.agent():
        await harness.pod("broken", "c-broken")
        assert await harness.outcome_for("c-broken") is Outcome.FAILED
    annotations = await harness.annotations(PODS, "broken")
    assert annotations[names.restore_status_annotation("main")] == "failed"
    assert "manifest.json is missing" in annotations[names.restore_message_annotation("main")]  # kept on the pod
    assert harness.node.calls == [("restore", "c-broken"), ("kill-container", "c-broken")]
    (event,) = await harness.events("broken")
    assert event["reason"] == "RestoreFailed" and "manifest.json is missing" in event["note"]


@pytest.mark.parametrize("cold", [True, False], ids=["falls-back-cold", "waits"])
async def test_a_restore_no_retry_can_fix_is_refused_for_good_without_killing_the_placeholder(harness, cold):
    """A checkpoint altered on storage fails its digest check on every fresh container: killing the
    placeholder would only crash-loop the pod. It is told so, and starts cold or waits, as it is set."""
    async def step(work):
        raise ArtifactInvalid(f"/checkpoints/{CHECKPOINT_ID}/versions/1/pages-1.img has SHA-256 00; the manifest "
                              "says ff")

    harness.node.restore_step = step
    env = {names.ENV_RESTORE_FALLBACK: names.RESTORE_FALLBACK_COLD} if cold else {}
    async with harness.agent():
        await harness.pod("altered", "c-altered", env=env)
        assert await harness.outcome_for("c-altered") is Outcome.FAILED
    assert harness.node.calls == [("restore", "c-altered"), ("refuse-restore", "c-altered")]  # no kill
    annotations = await harness.annotations(PODS, "altered")
    assert annotations[names.restore_status_annotation("main")] == "failed"
    assert annotations[names.restore_refused_annotation("main")] == CHECKPOINT_ID
    why = annotations[names.restore_message_annotation("main")]
    assert "pages-1.img has SHA-256" in why
    assert ("starts its workload cold" in why) is cold and ("waits without restarting" in why) is not cold


async def test_a_later_container_of_a_refused_pod_is_told_not_restored_again(harness):
    """A restore refused after it had begun changing the container (a bad page found while CRIU ran) has
    to kill it; the pod's next container learns the refusal at once instead of going round again."""
    async def step(work):
        raise ArtifactInvalid("pages-1.img has SHA-256 00; the manifest says ff")

    harness.node.restore_step = step
    async with harness.agent():
        await harness.pod("bad-pages", "c-first", env={names.ENV_RESTORE_FALLBACK: names.RESTORE_FALLBACK_COLD})
        assert await harness.outcome_for("c-first") is Outcome.FAILED
        await harness.restart_container("bad-pages", "c-second")
        assert await harness.outcome_for("c-second") is Outcome.FAILED
    assert harness.node.calls == [("restore", "c-first"), ("refuse-restore", "c-first"),
                                  ("refuse-restore", "c-second")]  # never restored twice, never killed
    annotations = await harness.annotations(PODS, "bad-pages")
    assert annotations[names.restore_container_id_annotation("main")] == "c-second"
    assert "starts its workload cold" in annotations[names.restore_message_annotation("main")]


async def test_a_restore_interrupted_by_an_agent_restart_is_not_run_again_on_that_container(harness):
    """A restarted agent finds `in_progress` for the running container: the restore may be half done, so
    the container is failed and killed (the kubelet starts a fresh one), never restored a second time."""
    async with harness.agent():
        await harness.pod("interrupted", "c-half", annotations={
            names.restore_status_annotation("main"): "in_progress",
            names.restore_container_id_annotation("main"): "c-half"})
        assert await harness.outcome_for("c-half") is Outcome.FAILED
    assert harness.node.calls == [("kill-container", "c-half")]
    assert (await harness.annotations(PODS, "interrupted"))[names.restore_status_annotation("main")] == "failed"


@pytest.mark.parametrize("unanswered", [["kill-container"], ["restore-finished", "kill-container"]],
                         ids=["kill", "finished-check-and-kill"])
async def test_an_interrupted_restore_whose_runtime_does_not_answer_is_killed_on_a_later_look(harness, unanswered):
    """A restarted agent on a busy node: containerd does not answer the look at the placeholder or its
    kill. The pod is looked at again until the kill lands, instead of waiting in standby for good under
    a `failed` that promised a fresh container."""
    harness.node.runtime_silent = list(unanswered)
    async with harness.agent():
        await harness.pod("busy-node", "c-half", annotations={
            names.restore_status_annotation("main"): "in_progress",
            names.restore_container_id_annotation("main"): "c-half"})
        assert await harness.outcome_for("c-half") is Outcome.RETRY
        assert await harness.outcome_for("c-half", not_=Outcome.RETRY) is Outcome.FAILED
    unanswered_calls = [("restore-finished-unanswered", "c-half")] if len(unanswered) == 2 else []
    assert harness.node.calls == [*unanswered_calls, ("kill-container-unanswered", "c-half"),
                                  ("kill-container", "c-half")]
    assert (await harness.annotations(PODS, "busy-node"))[names.restore_status_annotation("main")] == "failed"


async def test_a_restore_that_finished_before_an_agent_restart_is_recorded_not_undone(harness):
    """The agent restored the container and wrote restore-complete, but died before the pod said
    `completed`: the restarted agent records it and leaves the serving worker alone."""
    harness.node.restored.add("c-done")
    async with harness.agent():
        await harness.pod("finished", "c-done", annotations={
            names.restore_status_annotation("main"): "in_progress",
            names.restore_container_id_annotation("main"): "c-done"})
        assert await harness.outcome_for("c-done") is Outcome.COMPLETED
    assert harness.node.calls == []
    assert (await harness.annotations(PODS, "finished"))[names.restore_status_annotation("main")] == "completed"


# -- stopping ------------------------------------------------------------------------------------------------
async def test_a_stop_lets_a_running_restore_finish(harness):
    release = anyio.Event()
    running = anyio.Event()

    async def step(work):
        running.set()
        await release.wait()
        return restore_result()

    harness.node.restore_step = step
    async with anyio.create_task_group() as outer:
        async with harness.agent() as agent:
            await harness.pod("draining", "c-drain")
            with anyio.fail_after(30):
                await running.wait()

            async def release_once_draining() -> None:
                with anyio.fail_after(30):
                    await agent.stopping.wait()
                release.set()

            outer.start_soon(release_once_draining)
        # leaving the block stopped the agent; it waited for the restore
    assert await harness.outcome_for("c-drain", within_s=1) is Outcome.COMPLETED
    assert (await harness.annotations(PODS, "draining"))[names.restore_status_annotation("main")] == "completed"


async def test_a_stop_past_the_drain_timeout_fails_the_operation_cleanly(harness):
    running = anyio.Event()

    async def step(work):
        running.set()
        await anyio.sleep_forever()

    harness.node.restore_step = step
    async with harness.agent(drain_timeout=0.5):
        await harness.pod("stuck", "c-stuck")
        with anyio.fail_after(30):
            await running.wait()
    assert await harness.outcome_for("c-stuck", within_s=1) is Outcome.FAILED
    assert (await harness.annotations(PODS, "stuck"))[names.restore_status_annotation("main")] == "failed"
    assert ("kill-container", "c-stuck") in harness.node.calls
    (event,) = await harness.events("stuck")
    assert "stopped during the restore" in event["note"]
