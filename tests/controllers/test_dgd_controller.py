"""The DGD controller (SPEC section 5) in a real operator process, with the real ReplicaSet, Job and
garbage-collector controllers. The test plays the kubelet (pod status) and the snapshot agent."""

from __future__ import annotations

import copy
import time

import pytest

from dynamo_snapshot.api import names
from dynamo_snapshot.hashing import dgd_checkpoint_id, worker_hash
from tests.controllers.support import agent_daemonset, checkpoint_manifest, enabled_config, eventually

pytestmark = pytest.mark.integration

WORKER = "VllmDecodeWorker"
COMPONENT_SELECTOR = f"nvidia.com/dynamo-component={WORKER}"


def dgd_manifest(name: str = "graph", *, replicas: int = 1, policy: str = "Immediate", image: str = "placeholder:1",
                 deletion: str = "Delete", checkpoint: dict | None = None) -> dict:
    settings = {"enabled": True, "startupPolicy": policy, "deletionPolicy": deletion}
    return {
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoGraphDeployment",
        "metadata": {"name": name},
        "spec": {
            "backendFramework": "vllm",
            "envs": [{"name": "GRAPH_LEVEL", "value": "1"}],
            "services": {WORKER: {
                "componentType": "worker",
                "replicas": replicas,
                "envs": [{"name": "SERVICE_LEVEL", "value": "2"}],
                "resources": {"limits": {"gpu": "1"}},
                "extraPodSpec": {"mainContainer": {"image": image, "command": ["python3", "-m", "dynamo.vllm"]}},
                "checkpoint": checkpoint if checkpoint is not None else settings,
            }},
        },
    }


@pytest.fixture
def env(cluster, start_operator):
    cluster.apply(agent_daemonset())
    start_operator(enabled_config())
    return cluster


def auto_checkpoint_name(cluster, dgd_name: str = "graph") -> str:
    dgd = cluster.get("dgd", dgd_name)
    service = dgd["spec"]["services"][WORKER]
    whash = worker_hash(WORKER, service, dgd["spec"].get("envs"))
    return "checkpoint-" + dgd_checkpoint_id(cluster.namespace, dgd_name, dgd["metadata"]["uid"], WORKER, whash)


def confirm_checkpoint(cluster, name: str) -> None:
    """Play kubelet and agent for the checkpoint Job of `name` until it is Ready."""
    ckpt = cluster.wait_phase(name, "Creating")
    job = ckpt["status"]["jobName"]
    cluster.agent_verdict(job, "completed")  # the agent confirms before the workload exits
    cluster.run_job_to(job)
    cluster.wait_phase(name, "Ready")


def ready_condition(cluster, dgd: str = "graph") -> dict:
    return next(c for c in cluster.get("dgd", dgd)["status"]["conditions"] if c["type"] == "Ready")


def is_restore_shaped(pod: dict) -> bool:
    main = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in main.get("env", [])}
    return (env.get("DYN_SNAPSHOT_RESTORE_STANDBY") == "1"
            and "nvidia.com/snapshot-checkpoint-id" in pod["metadata"].get("labels", {}))


def test_immediate_cold_start_then_new_pods_restore(env):
    cluster = env
    cluster.apply(dgd_manifest(replicas=1))
    cold = cluster.wait_pods(COMPONENT_SELECTOR, 1)
    assert not is_restore_shaped(cold[0])
    main = cold[0]["spec"]["containers"][0]
    assert {"name": "GRAPH_LEVEL", "value": "1"} in main["env"]
    assert {"name": "SERVICE_LEVEL", "value": "2"} in main["env"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cluster.make_ready(cold[0]["metadata"]["name"])

    name = auto_checkpoint_name(cluster)
    ckpt = cluster.wait_created("dynamocheckpoint", name)
    labels, annotations = ckpt["metadata"]["labels"], ckpt["metadata"]["annotations"]
    assert labels["nvidia.com/snapshot-checkpoint-id"] == name.removeprefix("checkpoint-")
    assert labels["nvidia.com/dynamo-graph-deployment-name"] == "graph"
    assert labels["nvidia.com/dynamo-component"] == WORKER
    assert annotations["nvidia.com/dynamo-auto-checkpoint"] == "true"
    assert annotations["nvidia.com/dynamo-checkpoint-deletion-policy"] == "Delete"
    assert ckpt["metadata"]["ownerReferences"][0]["kind"] == "DynamoGraphDeployment"
    assert ckpt["spec"]["identity"]["model"] == f"{cluster.namespace}/graph"
    assert [c["name"] for c in ckpt["spec"]["job"]["podTemplateSpec"]["spec"]["containers"]] == ["main"]

    confirm_checkpoint(cluster, name)
    cluster.wait("dgd", "graph", f"{{.status.checkpoints.{WORKER}.ready}}", "true")
    status = cluster.get("dgd", "graph")["status"]["checkpoints"][WORKER]
    assert status["checkpointName"] == name and status["checkpointID"] == status["identityHash"]

    # existing pods are not touched; pods created from now on restore
    cluster.kubectl("patch", names.DGD_KUBECTL_V1ALPHA1, "graph", "-n", cluster.namespace, "--type=json",
                    "-p", f'[{{"op":"replace","path":"/spec/services/{WORKER}/replicas","value":3}}]')
    pods = cluster.wait_pods(COMPONENT_SELECTOR, 3)
    by_uid = {p["metadata"]["uid"]: p for p in pods}
    assert cold[0]["metadata"]["uid"] in by_uid and not is_restore_shaped(by_uid[cold[0]["metadata"]["uid"]])
    new = [p for uid, p in by_uid.items() if uid != cold[0]["metadata"]["uid"]]
    assert len(new) == 2 and all(is_restore_shaped(p) for p in new)
    restored = new[0]
    assert restored["metadata"]["annotations"]["nvidia.com/snapshot-target-containers"] == "main"
    assert restored["metadata"]["annotations"]["nvidia.com/snapshot-artifact-version"] == "1"
    probe = restored["spec"]["containers"][0]["startupProbe"]
    # started once restored or, Immediate falling back to a cold start, once the agent refused the restore
    assert probe["exec"]["command"] == ["sh", "-c", "cat /snapshot-control/restore-complete 2>/dev/null || "
                                        "cat /snapshot-control/restore-failed"] and probe["periodSeconds"] == 1
    # one generation, one checkpoint: the scale-up reused it
    assert len(cluster.list("dynamocheckpoints")) == 1
    assert len(cluster.list("replicasets")) == 1


def test_wait_for_checkpoint_holds_replicas_at_zero_until_ready(env):
    cluster = env
    cluster.apply(dgd_manifest(replicas=2, policy="WaitForCheckpoint"))
    name = auto_checkpoint_name(cluster)
    cluster.wait_created("dynamocheckpoint", name)
    cluster.wait("dgd", "graph", "{.status.conditions[?(@.type==\"Ready\")].reason}", "waiting_for_checkpoint")
    condition = ready_condition(cluster)
    assert WORKER in condition["message"]
    rs = cluster.list("replicasets")[0]
    assert rs["spec"]["replicas"] == 0 and not cluster.pods_of(COMPONENT_SELECTOR)
    confirm_checkpoint(cluster, name)
    pods = cluster.wait_pods(COMPONENT_SELECTOR, 2)
    assert all(is_restore_shaped(p) for p in pods)


def test_a_restore_the_agent_failed_is_explained_in_the_dgd_status(env):
    cluster = env
    cluster.apply(dgd_manifest(replicas=1, policy="WaitForCheckpoint"))
    name = auto_checkpoint_name(cluster)
    cluster.wait_created("dynamocheckpoint", name)
    confirm_checkpoint(cluster, name)
    (pod,) = cluster.wait_pods(COMPONENT_SELECTOR, 1)
    why = "the checkpoint ran on NVIDIA H200 (GPU-1), which the target cannot provide: it has no GPUs"
    cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", cluster.namespace,
                    "nvidia.com/snapshot-restore-status.main=failed", f"nvidia.com/snapshot-restore-message.main={why}")
    expected = f"{WORKER} (pod {pod['metadata']['name']}: restore failed: {why})"
    eventually(lambda: expected in ready_condition(cluster)["message"], what="the restore failure in the DGD status")
    # the next attempt clears it (the agent marks the new container in progress)
    cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", cluster.namespace, "--overwrite",
                    "nvidia.com/snapshot-restore-status.main=in_progress", "nvidia.com/snapshot-restore-message.main-")
    eventually(lambda: "restore failed" not in ready_condition(cluster)["message"], what="the failure to clear")


def test_failed_checkpoint_immediate_keeps_cold_starting(env):
    cluster = env
    cluster.apply(dgd_manifest(replicas=1))
    name = auto_checkpoint_name(cluster)
    ckpt = cluster.wait_phase(name, "Creating")
    cluster.agent_verdict(ckpt["status"]["jobName"], "failed")
    cluster.wait_phase(name, "Failed")
    cluster.kubectl("scale", "--replicas=2", "replicaset", "-l", "nvidia.com/dynamo-graph-deployment-name=graph",
                    "-n", cluster.namespace)  # a user's scale is undone: replicas follow the DGD
    cluster.kubectl("patch", names.DGD_KUBECTL_V1ALPHA1, "graph", "-n", cluster.namespace, "--type=json",
                    "-p", f'[{{"op":"replace","path":"/spec/services/{WORKER}/replicas","value":2}}]')
    pods = cluster.wait_pods(COMPONENT_SELECTOR, 2)
    assert not any(is_restore_shaped(p) for p in pods)


def test_failed_checkpoint_wait_for_checkpoint_stays_at_zero_and_says_why(env):
    cluster = env
    cluster.apply(dgd_manifest(replicas=1, policy="WaitForCheckpoint"))
    name = auto_checkpoint_name(cluster)
    ckpt = cluster.wait_phase(name, "Creating")
    cluster.run_job_to(ckpt["status"]["jobName"], exit_code=1, reason="Error")
    cluster.wait_phase(name, "Failed")
    eventually(lambda: "failed" in ready_condition(cluster)["message"], what="the DGD to say why")
    assert cluster.list("replicasets")[0]["spec"]["replicas"] == 0


def test_checkpoint_ref_is_used_as_is(env):
    cluster = env
    cluster.apply(checkpoint_manifest("shared-ckpt"))
    ref = {"enabled": True, "checkpointRef": "shared-ckpt", "startupPolicy": "Immediate"}
    cluster.apply(dgd_manifest(replicas=1, checkpoint=ref))
    cold = cluster.wait_pods(COMPONENT_SELECTOR, 1)
    assert not is_restore_shaped(cold[0])
    confirm_checkpoint(cluster, "shared-ckpt")
    cluster.wait("dgd", "graph", f"{{.status.checkpoints.{WORKER}.ready}}", "true")
    assert cluster.get("dgd", "graph")["status"]["checkpoints"][WORKER]["checkpointID"] == "96429b2725761a09"
    cluster.kubectl("patch", names.DGD_KUBECTL_V1ALPHA1, "graph", "-n", cluster.namespace, "--type=json",
                    "-p", f'[{{"op":"replace","path":"/spec/services/{WORKER}/replicas","value":2}}]')
    pods = cluster.wait_pods(COMPONENT_SELECTOR, 2)
    assert sum(is_restore_shaped(p) for p in pods) == 1
    assert [c["metadata"]["name"] for c in cluster.list("dynamocheckpoints")] == ["shared-ckpt"]


def test_missing_checkpoint_ref_is_reported(env):
    cluster = env
    cluster.apply(dgd_manifest(checkpoint={"enabled": True, "checkpointRef": "nope"}))
    cluster.wait("dgd", "graph", "{.status.state}", "failed")
    condition = ready_condition(cluster)
    assert "checkpointRef nope not found" in condition["message"]
    assert not cluster.list("dynamocheckpoints")


def test_identical_dgds_get_different_checkpoints(env):
    cluster = env
    cluster.apply(dgd_manifest("one"))
    cluster.apply(dgd_manifest("two"))
    first = cluster.wait_created("dynamocheckpoint", auto_checkpoint_name(cluster, "one"))
    second = cluster.wait_created("dynamocheckpoint", auto_checkpoint_name(cluster, "two"))
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert len(cluster.list("dynamocheckpoints")) == 2


def test_worker_generations(env):
    cluster = env
    cluster.apply(dgd_manifest(replicas=1))
    first = auto_checkpoint_name(cluster)
    cluster.wait_created("dynamocheckpoint", first)
    old_pod = cluster.wait_pods(COMPONENT_SELECTOR, 1)[0]
    cluster.make_ready(old_pod["metadata"]["name"])
    # replicas and the startup policy are not part of the worker: same generation, same checkpoint
    cluster.apply(dgd_manifest(replicas=2, policy="WaitForCheckpoint"))
    cluster.apply(dgd_manifest(replicas=1, policy="Immediate"))
    time.sleep(1.5)
    assert [c["metadata"]["name"] for c in cluster.list("dynamocheckpoints")] == [first]
    assert len(cluster.list("replicasets")) == 1
    # a changed container is a new generation: new ReplicaSet, new checkpoint; the old one stays until
    # the new one is available
    cluster.apply(dgd_manifest(replicas=1, image="placeholder:2"))
    second = auto_checkpoint_name(cluster)
    assert second != first
    cluster.wait_created("dynamocheckpoint", second)
    eventually(lambda: len(cluster.list("replicasets")) == 2, what="the new generation's ReplicaSet")
    replicasets = cluster.list("replicasets")
    new_rs = next(rs for rs in replicasets
                  if rs["spec"]["template"]["spec"]["containers"][0]["image"] == "placeholder:2")
    old_rs = next(rs for rs in replicasets if rs is not new_rs)
    assert old_rs["spec"]["replicas"] == 1
    new_hash = new_rs["metadata"]["labels"]["nvidia.com/dynamo-worker-hash"]
    new_pod = cluster.wait_pods(f"nvidia.com/dynamo-worker-hash={new_hash}", 1)[0]
    cluster.make_ready(new_pod["metadata"]["name"])
    def old_generation_scaled_down() -> bool:
        current = cluster.get_if_exists("replicaset", old_rs["metadata"]["name"])
        return current is None or current["spec"]["replicas"] == 0

    eventually(old_generation_scaled_down, what="the old generation to be scaled down")


def test_adopting_a_mismatched_checkpoint_is_refused(env):
    cluster = env
    cluster.apply(dgd_manifest(checkpoint={"enabled": False}))
    name = auto_checkpoint_name(cluster)
    impostor = checkpoint_manifest(name)
    impostor["metadata"]["annotations"] = {"nvidia.com/dynamo-auto-checkpoint": "true"}
    impostor["metadata"]["labels"] = {"nvidia.com/snapshot-checkpoint-id": name.removeprefix("checkpoint-"),
                                      "nvidia.com/dynamo-graph-deployment-name": "other"}
    cluster.apply(impostor)
    cluster.apply(dgd_manifest())
    cluster.wait("dgd", "graph", "{.status.state}", "failed")
    condition = ready_condition(cluster)
    assert "automatic checkpoint mismatch" in condition["message"]


def test_deleting_the_dgd_deletes_its_checkpoint_and_cleans_storage(env):
    cluster = env
    cluster.apply(dgd_manifest())
    name = auto_checkpoint_name(cluster)
    confirm_checkpoint(cluster, name)
    checkpoint_id = name.removeprefix("checkpoint-")
    cluster.kubectl("delete", "dgd", "graph", "-n", cluster.namespace, "--wait=false")
    cleanup_job = f"checkpoint-cleanup-{checkpoint_id}"
    job = cluster.wait_created("job", cleanup_job)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-2:] == [f"/checkpoints/{checkpoint_id}", "/checkpoints"]
    assert cluster.exists("dynamocheckpoint", name)  # held by its finalizer until the cleanup succeeded
    # the cleanup succeeds: the finalizer goes, the checkpoint with it, and the garbage collector may take
    # the finished Job before anyone could wait on its condition
    cluster.finish_pod(cluster.job_pod(cleanup_job)["metadata"]["name"], exit_code=0, reason="Completed")
    cluster.kubectl("wait", f"dynamocheckpoint/{name}", "-n", cluster.namespace, "--for=delete", "--timeout=60s")


def test_retain_policy_keeps_the_checkpoint(env):
    cluster = env
    cluster.apply(dgd_manifest(deletion="Retain"))
    name = auto_checkpoint_name(cluster)
    ckpt = cluster.wait_created("dynamocheckpoint", name)
    assert not ckpt["metadata"].get("ownerReferences")
    cluster.kubectl("delete", "dgd", "graph", "-n", cluster.namespace, "--wait=true", "--timeout=60s")
    time.sleep(2)  # give the garbage collector a chance to do the wrong thing
    assert cluster.exists("dynamocheckpoint", name)


def test_switching_to_retain_detaches_the_checkpoint(env):
    cluster = env
    cluster.apply(dgd_manifest())
    name = auto_checkpoint_name(cluster)
    assert cluster.wait_created("dynamocheckpoint", name)["metadata"]["ownerReferences"]
    manifest = copy.deepcopy(dgd_manifest(deletion="Retain"))
    cluster.apply(manifest)
    eventually(lambda: not cluster.get("dynamocheckpoint", name)["metadata"].get("ownerReferences"),
               what="the owner reference to go")
    assert cluster.get("dynamocheckpoint", name)["metadata"]["annotations"][
        "nvidia.com/dynamo-checkpoint-deletion-policy"] == "Retain"
