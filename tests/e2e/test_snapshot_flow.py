"""The whole flow on one machine, all real: a kubelet runs the pods on containerd, the operator and the
snapshot agent run as processes, CRIU dumps and restores. What the user guide promises, checked on the
objects and on what the restored workers say about themselves."""

from __future__ import annotations

import json
import time

import pytest

from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact import verification
from dynamo_snapshot.agent.container.criu import CriuBundle
from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster.images import PLACEHOLDER_IMAGE
from dynamo_snapshot.devcluster.scenarios import (
    Flow,
    checkpoint_manifest,
    component_selector,
    dgd_manifest,
    dgd_manifest_v1beta1,
)
from dynamo_snapshot.kube import DYNAMO_GRAPH_DEPLOYMENTS, PODS

pytestmark = pytest.mark.e2e

MAIN = "main"


def container_id(pod: dict) -> str:
    return pod["status"]["containerStatuses"][0]["containerID"].partition("://")[2]


def restore_annotations(pod: dict) -> dict[str, str]:
    annotations = pod["metadata"].get("annotations") or {}
    return {k: v for k, v in annotations.items() if k.startswith(names.ANN_RESTORE_STATUS_PREFIX)
            or k.startswith(names.ANN_RESTORE_CONTAINER_ID_PREFIX)}


def agent_events(flow: Flow, name: str) -> list[dict]:
    return [e for e in flow.stack.list("events.events.k8s.io") if e.get("regarding", {}).get("name") == name
            and e.get("reportingController") == "nvidia.com/snapshot-agent"]


def test_a_checkpoint_is_ready_once_the_agent_confirms_it(flow: Flow):
    stack = flow.stack
    run = flow.create_checkpoint(checkpoint_manifest("standalone"))

    ckpt = stack.get("dynamocheckpoint", "standalone")
    assert ckpt["status"]["createdAt"] and ckpt["status"]["identityHash"] == run.checkpoint_id
    job = stack.get("job", run.job)
    assert job["metadata"]["annotations"][names.ANN_CHECKPOINT_STATUS] == "completed"
    assert [e["reason"] for e in agent_events(flow, run.job)] == ["CheckpointCompleted"]
    assert not stack.list("leases")  # released once the verdict is on the Job
    # The worker learned snapshot-complete after the verdict and exited 0: the Job completed on its own.
    source = stack.get("pod", run.source_pod)
    assert source["status"]["phase"] == "Succeeded"
    assert [e["event"] for e in stack.worker_events(run.source_pod)][-1] == "snapshot-complete"
    # What is on storage is whole: every file as the manifest lists it.
    here = artifact.Compatibility.of_this_node(CriuBundle.locate().version())
    final = artifact_layout.ArtifactLayout(stack.checkpoints, run.checkpoint_id).final_dir
    manifest = verification.verify(final, run.checkpoint_id, here)
    assert manifest["workload"]["containerName"] == MAIN


def test_wait_for_checkpoint_starts_workers_only_from_the_checkpoint(flow: Flow):
    stack = flow.stack
    started = time.time()
    stack.apply(dgd_manifest("waiting", replicas=2, policy="WaitForCheckpoint"))
    run = flow.wait_checkpoint(flow.auto_checkpoint_name("waiting"), started)
    pods = flow.wait_restored(component_selector("waiting"), 2, started)

    for restored in pods:
        assert restored.instance == run.instance  # the checkpointed process, not a cold start
        assert restored.heap_ok
        assert restored.hostname == restored.name  # it lives in its own pod now
    objects = flow.pods(component_selector("waiting"))
    assert len(objects) == 2  # no cold worker ever existed beside them
    for pod in objects:
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        assert restore_annotations(pod) == {names.restore_status_annotation(MAIN): "completed",
                                            names.restore_container_id_annotation(MAIN): container_id(pod)}
        assert [e["reason"] for e in agent_events(flow, pod["metadata"]["name"])] == ["Restored"]
    dgd = stack.get("dgd", "waiting")
    assert dgd["status"]["checkpoints"]["worker"]["ready"] is True


def test_a_v1beta1_dgd_is_checkpointed_and_restored_as_its_v1alpha1_twin(flow: Flow):
    """Upstream's v1beta1 shape on the real kubelet: the same automatic checkpoint and restored workers as
    the v1alpha1 graph above, its status written through v1beta1 (the shape it was written in)."""
    stack = flow.stack
    started = time.time()
    stack.apply(dgd_manifest_v1beta1("beta", replicas=1, policy="WaitForCheckpoint"))
    run = flow.wait_checkpoint(flow.auto_checkpoint_name("beta"), started)
    (restored,) = flow.wait_restored(component_selector("beta"), 1, started)
    assert restored.instance == run.instance and restored.heap_ok
    dgd = stack.wait_object(DYNAMO_GRAPH_DEPLOYMENTS.at_version(f"{names.GROUP}/{names.DGD_VERSION_V1BETA1}"),
                            "beta", lambda d: (d.get("status") or {}).get("state") == "successful",
                            "the v1beta1 DGD to be successful")
    assert "components" in dgd["spec"] and dgd["status"]["checkpoints"]["worker"]["ready"] is True


def test_immediate_starts_cold_then_scale_up_restores_and_restarts_restore_nothing_twice(flow: Flow):
    stack = flow.stack
    selector = component_selector("immediate")
    started = time.time()
    stack.apply(dgd_manifest("immediate", replicas=1, policy="Immediate"))
    (cold,) = flow.wait_pods(selector, lambda p: p["status"].get("phase") == "Running", 1, "the cold worker")
    run = flow.wait_checkpoint(flow.auto_checkpoint_name("immediate"), started)
    cold_instance = next(e["instance"] for e in stack.worker_events(cold["metadata"]["name"]))
    assert cold_instance != run.instance  # the cold worker is its own process

    (first,) = flow.wait_restored(selector, 1, flow.scale("immediate", 2))
    assert first.instance == run.instance and first.heap_ok
    # the file the worker declared with ready-for-snapshot was read into the page cache by the restore
    stack.wait_until(lambda: [r for r in stack.agent_events("prefetch finished")
                              if r["files"] == 1 and r["bytes"] > 0 and r["errors"] == 0 and not r["stopped"]],
                     "the declared file's prefetch")

    # A restarted agent finds the restored pod annotated for its container: it does not restore it again.
    stack.restart_agent(kill=True)
    restored_before = len(stack.agent_events("restore completed"))
    restored = flow.wait_restored(selector, 2, flow.scale("immediate", 3))
    assert len(stack.agent_events("restore completed")) == restored_before + 1  # only the new pod

    pods = {p["metadata"]["name"]: p for p in flow.pods(selector)}
    assert set(pods) == {cold["metadata"]["name"], *(p.name for p in restored)}
    still_cold = pods[cold["metadata"]["name"]]
    assert container_id(still_cold) == container_id(cold)  # never touched
    assert still_cold["status"]["containerStatuses"][0]["restartCount"] == 0
    assert restore_annotations(still_cold) == {}
    first_now = pods[first.name]
    assert restore_annotations(first_now)[names.restore_container_id_annotation(MAIN)] == first.container_id
    assert first_now["status"]["containerStatuses"][0]["restartCount"] == 0


def test_a_checkpoint_that_cannot_be_dumped_fails_and_leaves_nothing(flow: Flow):
    stack = flow.stack
    container = {"name": MAIN, "image": PLACEHOLDER_IMAGE, "imagePullPolicy": "IfNotPresent",
                 "command": ["python3", "/opt/workloads/counter.py"],
                 "env": [{"name": "COUNTER_HEAP_MB", "value": "16"}, {"name": "COUNTER_HOLD_IO_URING", "value": "1"}]}
    stack.apply(checkpoint_manifest("undumpable", model="demo/io-uring", container=container))
    ckpt = flow.wait_verdict("undumpable")

    assert ckpt["status"]["phase"] == "Failed"
    # the agent's reason is in the checkpoint's own status, not only in its events and logs
    assert "snapshot-agent reported the checkpoint" in ckpt["status"]["message"]
    assert "criu dump failed" in ckpt["status"]["message"]
    job = ckpt["status"]["jobName"]
    assert stack.get("job", job)["metadata"]["annotations"][names.ANN_CHECKPOINT_STATUS] == "failed"
    (event,) = agent_events(flow, job)
    assert event["reason"] == "CheckpointFailed" and "criu dump failed" in event["note"]
    layout = artifact_layout.ArtifactLayout(stack.checkpoints, ckpt["status"]["checkpointID"])
    assert not layout.final_dir.exists()
    assert not any(layout.staging_root.iterdir())
    # The workload was killed, so the Job's pod failed rather than lingering until its deadline.
    (pod,) = stack.list("pods", f"batch.kubernetes.io/job-name={job}")
    stack.wait_object(PODS, pod["metadata"]["name"], lambda p: p["status"].get("phase") == "Failed",
                      "the source pod to fail", timeout=60)
    assert not stack.list("leases")


def test_a_failed_restore_is_retried_on_a_fresh_container(flow: Flow):
    """A restore pod for a checkpoint that is not on storage: the agent says why, kills the placeholder,
    the kubelet starts a new container, and that one is tried (and fails) in turn."""
    stack = flow.stack
    missing_id = "00000000000000000000000000000000"
    stack.apply({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "orphan", "labels": {names.LABEL_CHECKPOINT_ID: missing_id},
                     "annotations": {names.ANN_TARGET_CONTAINERS: MAIN}},
        "spec": {"containers": [{
            "name": MAIN, "image": PLACEHOLDER_IMAGE, "imagePullPolicy": "IfNotPresent",
            "env": [{"name": names.ENV_RESTORE_STANDBY, "value": "1"},
                    {"name": names.ENV_CONTROL_DIR, "value": names.CONTROL_DIR}],
            "volumeMounts": [{"name": "control", "mountPath": names.CONTROL_DIR}]}],
            "volumes": [{"name": "control", "emptyDir": {}}]},
    })

    def failed_on(pod: dict, previous: str | None) -> bool:
        annotations = restore_annotations(pod)
        tried = annotations.get(names.restore_container_id_annotation(MAIN))
        return annotations.get(names.restore_status_annotation(MAIN)) == "failed" and tried not in (None, previous)

    first = stack.wait_object(PODS, "orphan", lambda p: failed_on(p, None), "the first restore to fail")
    first_id = restore_annotations(first)[names.restore_container_id_annotation(MAIN)]
    second = stack.wait_object(PODS, "orphan", lambda p: failed_on(p, first_id), "the retry on a new container",
                               timeout=120)
    assert second["status"]["containerStatuses"][0]["restartCount"] >= 1
    notes = [e["note"] for e in agent_events(flow, "orphan") if e["reason"] == "RestoreFailed"]
    assert notes and all(f"{missing_id}/versions/1/manifest.json is missing" in n for n in notes)
    # the reason also stays on the pod, for when the events have expired
    why = second["metadata"]["annotations"][names.restore_message_annotation(MAIN)]
    assert f"{missing_id}/versions/1/manifest.json is missing" in why


def _alter_a_page_image(flow: Flow, checkpoint_id: str) -> None:
    """What storage corruption (or an attacker with write access to the volume) does to a checkpoint."""
    layout = artifact_layout.ArtifactLayout(flow.stack.checkpoints, checkpoint_id)
    page = max(layout.final_dir.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with page.open("r+b") as f:
        f.seek(page.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def _scale_onto_an_altered_checkpoint(flow: Flow, dgd: str, policy: str):
    """A DGD whose checkpoint is altered on storage once Ready (and restored once while intact, where no
    cold pod serves meanwhile), scaled up: the new pod's refused restore and the checkpoint's run."""
    started = time.time()
    flow.stack.apply(dgd_manifest(dgd, replicas=1, policy=policy))
    run = flow.wait_checkpoint(flow.auto_checkpoint_name(dgd), started)
    if policy == "WaitForCheckpoint":
        flow.wait_restored(component_selector(dgd), 1, started)
    _alter_a_page_image(flow, run.checkpoint_id)
    flow.scale(dgd, 2)

    def refused(pod: dict) -> bool:
        annotations = pod["metadata"].get("annotations") or {}
        return annotations.get(names.restore_status_annotation(MAIN)) == "failed"

    (pod,) = flow.wait_pods(component_selector(dgd), refused, 1, "the refused restore")
    return pod, run


def test_an_immediate_dgd_whose_checkpoint_fails_verification_starts_new_pods_cold_without_a_crash_loop(flow: Flow):
    stack = flow.stack
    selector = component_selector("fallback")
    pod, run = _scale_onto_an_altered_checkpoint(flow, "fallback", "Immediate")
    name = pod["metadata"]["name"]
    why = pod["metadata"]["annotations"][names.restore_message_annotation(MAIN)]
    assert "SHA-256" in why and "starts its workload cold" in why
    # the placeholder started the worker cold in the same container: a new instance, not the checkpointed one
    cold = stack.wait_until(lambda: [e for e in stack.worker_events(name) if e["event"] == "started"],
                            "the cold start in the refused pod", 60)
    assert cold[0]["instance"] != run.instance
    (ready,) = flow.wait_pods(f"{selector}", lambda p: p["metadata"]["name"] == name and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in p["status"].get("conditions") or []),
        1, "the cold-started pod to be Ready", timeout=120)
    # A bad page is found while CRIU runs (pages are verified beside it), after the container was changed:
    # that one container is restarted, clean, and learns the refusal. Never more than that.
    assert ready["status"]["containerStatuses"][0]["restartCount"] <= 1
    notes = [e["note"] for e in agent_events(flow, name) if e["reason"] == "RestoreFailed"]
    assert len(notes) == 1
    assert not [r for r in stack.agent_events("restore failed; killing the placeholder") if r.get("name") == name]


def test_a_wait_for_checkpoint_dgd_whose_checkpoint_fails_verification_waits_and_says_why(flow: Flow):
    stack = flow.stack
    pod, _ = _scale_onto_an_altered_checkpoint(flow, "strict", "WaitForCheckpoint")
    assert "waits without restarting" in pod["metadata"]["annotations"][names.restore_message_annotation(MAIN)]
    dgd = stack.wait_object(DYNAMO_GRAPH_DEPLOYMENTS, "strict", lambda d: f"pod {pod['metadata']['name']}: restore "
                            "failed" in json.dumps(d.get("status") or {}), "the DGD to say why", timeout=60)
    assert dgd["status"]["state"] != "successful"
    now = stack.get("pod", pod["metadata"]["name"])
    assert now["status"]["containerStatuses"][0]["restartCount"] <= 1  # see the Immediate case
    assert not [e for e in stack.worker_events(pod["metadata"]["name"]) if e["event"] == "started"]  # no cold start


def test_a_guide_era_worker_that_writes_ready_for_checkpoint_is_checkpointed(flow: Flow):
    """Workers built on guide-era upstream write ready-for-checkpoint (empty), not ready-for-snapshot."""
    from dynamo_snapshot.devcluster.scenarios import worker_container

    container = worker_container(16, COUNTER_LEGACY_MARKER="1")
    run = flow.create_checkpoint(checkpoint_manifest("legacy-marker", model="demo/legacy", container=container))
    layout = artifact_layout.ArtifactLayout(flow.stack.checkpoints, run.checkpoint_id)
    assert (layout.final_dir / "manifest.json").is_file()
    events = flow.stack.worker_events(run.source_pod)
    assert [e["event"] for e in events][-1] == "snapshot-complete"  # told, and exited 0 like any worker
