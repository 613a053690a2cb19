"""The snapshot agent SIGKILLed in the middle of a checkpoint or a restore on the real kubelet, then started
again: every kill ends in a state that tells the truth, within a bound after the agent is back.

    checkpoint  Ready only with a verified, promoted artifact; otherwise Failed with a reason (or a fresh
                attempt that ends so); the source pod does not stay frozen; no Lease is left behind
    restore     the pod ends restored (a fresh container may be needed), never stuck ``in_progress``

Every stage once; ``DYN_SNAPSHOT_FAULT_SWEEP=1`` runs each twice. A larger heap keeps each stage long
enough for the kill to land in it; where the kill lands decides the path (on a loaded 2-core CI machine
too), and the stage the agent had actually entered last is what each case reports, so the assertions
are about truthfulness, not timing. The restarted agent settles what its predecessor left first
(``agent/service/leftovers.py``).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster.scenarios import Flow, checkpoint_manifest, component_selector, dgd_manifest
from dynamo_snapshot.kube import PODS

REPEAT = 2 if os.environ.get("DYN_SNAPSHOT_FAULT_SWEEP") == "1" else 1
pytestmark = pytest.mark.e2e
CHECKPOINT_STAGES = ["resolve", "cuda", "freeze", "dump", "rootfs", "dev-shm", "manifest", "promote", "confirm",
                     "release"] * REPEAT
RESTORE_STAGES = ["verify", "pids", "rootfs", "dev-shm", "criu", "cuda", "signal"] * REPEAT
HEAP_MIB = 384
SETTLE_S = 180  # about one Lease duration plus a checkpoint, on a loaded 2-core machine


def _stage_records(flow: Flow, pipeline: str) -> list[dict]:
    return [r for r in flow.stack.agent_events(f"{pipeline} stage")]


def _kill_agent_at(flow: Flow, pipeline: str, stage: str, seen_before: int, timeout: float = 240,
                   checkpoint: str | None = None) -> str:
    """SIGKILL the agent as soon as its log shows ``stage`` of a new ``pipeline`` run, start it again; the
    stage it had entered last when it died. The log has no watch: it is read every 20 ms (and the
    ``checkpoint``'s phase every second: one that ends before the stage is a failure to explain)."""
    deadline = time.monotonic() + timeout
    looked = 0.0
    while time.monotonic() < deadline:
        records = _stage_records(flow, pipeline)[seen_before:]
        if any(r.get("stage") == stage for r in records):
            flow.stack.restart_agent(kill=True)
            return records[-1]["stage"]
        if any(r.get("stage") == "release" for r in records) and pipeline == "checkpoint":
            pytest.fail(f"the checkpoint finished before the {stage} stage was seen")
        if checkpoint is not None and time.monotonic() - looked > 1:
            looked = time.monotonic()
            status = flow.stack.get("dynamocheckpoint", checkpoint).get("status") or {}
            if status.get("phase") in ("Ready", "Failed"):
                pytest.fail(f"checkpoint {checkpoint} went {status['phase']} before the agent entered the {stage} "
                            f"stage: {status.get('message')}\n{flow.stack.explain()}")
        time.sleep(0.02)
    raise TimeoutError(f"the agent never entered the {pipeline} stage {stage}\n{flow.stack.explain()}")


def _where_the_restore_got(flow: Flow, dgd: str) -> str:
    """What a timed-out restore needs explained: the agent's lines about the DGD's pods since it restarted,
    and each pod's restore annotations and container states (the module prints only the log's tail)."""
    pods = flow.pods(component_selector(dgd))
    names_ = {p["metadata"]["name"] for p in pods}
    records = flow.stack.agent_events()
    started = max((i for i, r in enumerate(records) if r.get("event") == "snapshot agent starting"), default=0)
    lines = [json.dumps(r) for r in records[started:] if r.get("name") in names_ or r.get("level") != "info"
             or "stage" in r]
    for pod in pods:
        statuses = [{"name": c.get("name"), "containerID": c.get("containerID"), "state": c.get("state"),
                     "restartCount": c.get("restartCount")} for c in pod["status"].get("containerStatuses") or []]
        lines.append(json.dumps({"pod": pod["metadata"]["name"], "phase": pod["status"].get("phase"),
                                 "annotations": pod["metadata"].get("annotations"), "containers": statuses}))
    return "\n".join(lines[-60:])


@pytest.mark.parametrize("stage", CHECKPOINT_STAGES)
def test_an_agent_killed_during_a_checkpoint_leaves_a_truthful_verdict(flow: Flow, stage: str):
    stack = flow.stack
    name = f"killed-{stage}-{len(stack.list('dynamocheckpoints'))}"
    before = len(_stage_records(flow, "checkpoint"))
    stack.apply(checkpoint_manifest(name, heap_mib=HEAP_MIB, model=f"demo/{name}"))
    last = _kill_agent_at(flow, "checkpoint", stage, before, checkpoint=name)
    back = time.monotonic()
    ckpt = flow.wait_verdict(name, timeout=SETTLE_S)
    status = ckpt["status"]
    print(json.dumps({"stage": stage, "last_stage_entered": last, "phase": status["phase"],
                      "settled_s": round(time.monotonic() - back, 1), "message": status.get("message")}))
    layout = artifact_layout.ArtifactLayout(stack.checkpoints, status["checkpointID"])
    if status["phase"] == "Ready":
        assert (layout.final_dir / "manifest.json").is_file()  # Ready only with a promoted, signed artifact
    else:
        assert status.get("message"), "a Failed checkpoint says why"
    # the source does not stay frozen or stopped: its pod ends
    stack.watch(PODS, lambda pods: pods and all(p["status"].get("phase") in ("Succeeded", "Failed") for p in pods),
                "the source pod to end", label_selector=f"{names.LABEL_JOB_NAME}={status['jobName']}", timeout=120)
    stack.wait_until(lambda: not [lease for lease in stack.list("leases")
                                  if lease["metadata"]["name"] == status["jobName"]],
                     "the checkpoint's Lease to go", 120)


@pytest.mark.parametrize("stage", RESTORE_STAGES)
def test_an_agent_killed_during_a_restore_still_ends_with_the_pod_restored(flow: Flow, stage: str):
    stack = flow.stack
    dgd = f"restore-{stage}-{len(stack.list('dynamographdeployments'))}"
    started = time.time()
    # Counted before the DGD exists, and the log watched from then on: the restore starts as soon as the
    # checkpoint is Ready, and on a loaded machine it can be past the stage before a test that first waited
    # for the Ready had looked (the kill then never came).
    before = len(_stage_records(flow, "restore"))
    stack.apply(dgd_manifest(dgd, replicas=1, policy="WaitForCheckpoint", heap_mib=HEAP_MIB))
    last = _kill_agent_at(flow, "restore", stage, before)
    back = time.monotonic()
    flow.wait_checkpoint(flow.auto_checkpoint_name(dgd), started)
    try:
        (pod,) = flow.wait_restored(component_selector(dgd), 1, started, timeout=SETTLE_S)
    except TimeoutError:
        pytest.fail(f"the pod was not restored {SETTLE_S} s after the agent was killed in the {last} stage:\n"
                    + _where_the_restore_got(flow, dgd))
    print(json.dumps({"stage": stage, "last_stage_entered": last, "settled_s": round(time.monotonic() - back, 1),
                      "pod": pod.name}))
    assert pod.heap_ok
    now = stack.get("pod", pod.name)
    annotations = now["metadata"].get("annotations") or {}
    assert annotations[names.restore_status_annotation("main")] == names.STATUS_COMPLETED
