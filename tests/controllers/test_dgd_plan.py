"""What one DGD component should look like (controllers/dgd/plan.py, `plan_component`), without a cluster:
cold start, the automatic checkpoint to create, startup policies, restore once the checkpoint is Ready.
End to end in test_dgd_controller.py."""

from __future__ import annotations

import copy

import msgspec

from dynamo_snapshot.api import (
    DynamoCheckpoint,
    Phase,
    StorageAccessMode,
    convert,
    decode_dgd,
    names,
)
from dynamo_snapshot.controllers.dgd.plan import plan_component
from dynamo_snapshot.controllers.storage import Storage

STORAGE = Storage(mode=StorageAccessMode.AGENT_MOUNT, pvc_name="snapshot-pvc", base_path="/checkpoints")


def _dgd(checkpoint=None, backend="vllm", replicas=2):
    raw = {
        "apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment",
        "metadata": {"name": "graph", "namespace": "ns", "uid": "dgd-uid", "resourceVersion": "1"},
        "spec": {"services": {"Worker": {
            "componentType": "worker", "replicas": replicas,
            "extraPodSpec": {"mainContainer": {"image": "placeholder:1", "args": ["--model", "m"]}},
            **({"checkpoint": checkpoint} if checkpoint is not None else {})}}},
    }
    if backend:
        raw["spec"]["backendFramework"] = backend
    return raw


def _plan(raw, checkpoints=None, storage=STORAGE, by_id=None):
    dgd = decode_dgd(msgspec.json.encode(raw))
    found = checkpoints or {}
    return plan_component(dgd, "Worker", dgd.spec.services["Worker"], get_checkpoint=found.get,
                          storage=storage, find_by_id=(by_id or {}).get)


def _as_stored(body, phase: Phase | None, message: str = "") -> DynamoCheckpoint:
    stored = copy.deepcopy(body)
    stored["metadata"].update(namespace="ns", uid="ckpt-uid", resourceVersion="7")
    ckpt = convert(stored, DynamoCheckpoint)
    return msgspec.structs.replace(ckpt, status=msgspec.structs.replace(ckpt.status, phase=phase, message=message))


def test_a_component_without_checkpointing_starts_cold_at_its_replicas():
    plan = _plan(_dgd())
    assert (plan.checkpointing, plan.restore, plan.replicas, plan.problems) == (False, False, 2, [])
    assert plan.replicaset_name == f"graph-worker-{plan.worker_hash}"
    main = plan.template["spec"]["containers"][0]
    assert main["image"] == "placeholder:1" and main["args"] == ["--model", "m"]


def test_the_worker_hash_follows_what_runs_in_the_container():
    before = _plan(_dgd()).worker_hash
    changed = _dgd()
    changed["spec"]["services"]["Worker"]["extraPodSpec"]["mainContainer"]["args"] = ["--model", "other"]
    assert _plan(changed).worker_hash != before
    assert _plan(_dgd(replicas=5)).worker_hash == before  # scaling is not a new generation


def test_an_automatic_checkpoint_is_planned_when_absent_and_immediate_starts_cold_meanwhile():
    plan = _plan(_dgd({"enabled": True}))
    assert plan.checkpointing and plan.auto_checkpoint is not None
    assert plan.auto_checkpoint["metadata"]["name"] == plan.auto_checkpoint_name
    assert plan.replicas == 2 and not plan.restore and plan.waiting is None
    assert plan.checkpoint_status is not None and not plan.checkpoint_status.ready


def test_an_automatic_checkpoint_needs_the_backend_framework():
    plan = _plan(_dgd({"enabled": True}, backend=None))
    assert plan.auto_checkpoint is None
    assert plan.problems == ["component Worker: spec.backendFramework is required for automatic checkpoints "
                             "(vllm, sglang or trtllm)"]


def test_wait_for_checkpoint_holds_the_component_at_zero_until_ready():
    plan = _plan(_dgd({"enabled": True, "startupPolicy": "WaitForCheckpoint"}))
    assert plan.replicas == 0 and plan.target_replicas == 2
    assert plan.waiting == f"Worker: waiting for checkpoint {plan.auto_checkpoint_name} to become Ready"


def test_a_failed_checkpoint_under_wait_for_checkpoint_says_why_it_waits():
    raw = _dgd({"enabled": True, "startupPolicy": "WaitForCheckpoint"})
    first = _plan(raw)
    failed = _as_stored(first.auto_checkpoint, Phase.FAILED, "the agent said no")
    plan = _plan(raw, {first.auto_checkpoint_name: failed})
    assert plan.replicas == 0 and "failed (the agent said no)" in plan.waiting


def test_a_ready_checkpoint_makes_new_pods_restore_from_it():
    raw = _dgd({"enabled": True, "startupPolicy": "WaitForCheckpoint"})
    first = _plan(raw)
    ready = _as_stored(first.auto_checkpoint, Phase.READY)
    plan = _plan(raw, {first.auto_checkpoint_name: ready})
    assert plan.restore and plan.replicas == 2 and plan.waiting is None and plan.checkpoint_status.ready
    assert plan.template != first.template  # restore-shaped: the artifact mounted, the standby set


def _env(template) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env") or []}


def test_restored_pods_of_immediate_fall_back_cold_and_those_of_wait_for_checkpoint_do_not():
    for policy, falls_back in (("Immediate", True), ("WaitForCheckpoint", False)):
        raw = _dgd({"enabled": True, "startupPolicy": policy})
        first = _plan(raw)
        plan = _plan(raw, {first.auto_checkpoint_name: _as_stored(first.auto_checkpoint, Phase.READY)})
        env = _env(plan.template)
        assert env[names.ENV_RESTORE_STANDBY] == "1"
        assert (env.get(names.ENV_RESTORE_FALLBACK) == names.RESTORE_FALLBACK_COLD) is falls_back, policy
        # the startup probe lets a cold start through only where the pod may start cold
        probe = " ".join(plan.template["spec"]["containers"][0]["startupProbe"]["exec"]["command"])
        assert names.FILE_RESTORE_COMPLETE in probe
        assert (names.FILE_RESTORE_FAILED in probe) is falls_back, policy


def test_a_ready_checkpoint_without_storage_starts_cold_and_says_so():
    raw = _dgd({"enabled": True})
    first = _plan(raw)
    plan = _plan(raw, {first.auto_checkpoint_name: _as_stored(first.auto_checkpoint, Phase.READY)}, storage=None)
    assert not plan.restore and plan.template == first.template
    assert plan.problems == [f"component Worker: checkpoint {first.auto_checkpoint_name} is Ready but checkpoint "
                             "storage is unavailable in this namespace; starting cold"]


def test_a_checkpoint_ref_that_does_not_exist_is_a_problem_naming_it():
    plan = _plan(_dgd({"enabled": True, "checkpointRef": "missing"}))
    assert plan.problems == ["component Worker: checkpointRef missing not found in namespace ns"]
    assert plan.auto_checkpoint is None


def test_a_checkpoint_ref_without_enabled_true_starts_cold_as_upstream_does():
    plan = _plan(_dgd({"checkpointRef": "missing"}))
    assert (plan.checkpointing, plan.restore, plan.problems, plan.checkpoint_status) == (False, False, [], None)


def test_target_container_name_picks_the_container_that_is_checkpointed():
    raw = _dgd({"enabled": True, "targetContainerName": "engine"})
    raw["spec"]["services"]["Worker"]["extraPodSpec"]["containers"] = [{"name": "engine", "image": "e-placeholder"}]
    plan = _plan(raw)
    job = plan.auto_checkpoint["spec"]["job"]
    assert job["targetContainerName"] == "engine"
    assert [c["name"] for c in job["podTemplateSpec"]["spec"]["containers"]] == ["engine"]


def test_a_target_container_name_the_pod_lacks_is_a_problem_naming_it_and_the_containers():
    plan = _plan(_dgd({"enabled": True, "targetContainerName": "engine"}))
    assert plan.problems == ["component Worker: checkpoint.targetContainerName engine is not a container of "
                             "its pod (main)"]
    assert plan.auto_checkpoint is None and not plan.checkpointing


def test_manual_mode_with_an_identity_restores_from_the_checkpoint_with_its_legacy_hash():
    from dynamo_snapshot.hashing import identity_hash
    from tests.controllers.support import checkpoint_manifest

    identity = {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"}
    raw = _dgd({"enabled": True, "mode": "Manual", "identity": identity, "startupPolicy": "WaitForCheckpoint"})
    waiting = _plan(raw)
    assert waiting.replicas == 0 and waiting.problems == [] and waiting.auto_checkpoint is None
    assert waiting.waiting == f"Worker: waiting for a DynamoCheckpoint with checkpoint ID {identity_hash(identity)}"
    ckpt = _as_stored(checkpoint_manifest("legacy"), Phase.READY)
    ckpt = msgspec.structs.replace(ckpt, status=msgspec.structs.replace(ckpt.status,
                                                                       checkpoint_id=identity_hash(identity)))
    plan = _plan(raw, by_id={identity_hash(identity): ckpt})
    assert plan.restore and plan.replicas == 2
    assert plan.checkpoint_status.checkpoint_name == "legacy"
