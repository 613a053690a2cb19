"""Upstream's DynamoGraphDeployment in both versions it serves (nvidia.com/v1alpha1, the storage version,
and nvidia.com/v1beta1), written from upstream's Go types and CRD at 628904df: `kubectl apply
--validate=strict` into the real API server, and the operator giving both shapes the same meaning."""

from __future__ import annotations

import copy
import json

import pytest

from dynamo_snapshot.api import as_services_shape
from dynamo_snapshot.hashing import dgd_checkpoint_id, worker_hash
from tests.controllers.support import agent_daemonset, enabled_config, eventually

pytestmark = pytest.mark.integration

WORKER = "VllmDecodeWorker"
MAIN = {"name": "main", "image": "registry.example.com/vllm-runtime-placeholder:1.0.0",
        "command": ["python3", "-m", "dynamo.vllm"], "args": ["--model", "Qwen/Qwen3-0.6B"],
        "resources": {"limits": {"nvidia.com/gpu": "1"}}}


def v1alpha1(name: str = "graph", **checkpoint) -> dict:
    """The guide's DGD: a worker with `checkpoint` and upstream's other service fields, left as upstream
    writes them (GMS and failover off)."""
    return {
        "apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment", "metadata": {"name": name},
        "spec": {"backendFramework": "vllm", "envs": [{"name": "GRAPH_LEVEL", "value": "1"}], "services": {
            "Frontend": {"componentType": "frontend", "replicas": 1,
                         "extraPodSpec": {"mainContainer": {"image": "registry.example.com/frontend:1.0.0"}}},
            WORKER: {
                "componentType": "worker", "subComponentType": "decode", "replicas": 1,
                "sharedMemory": {"size": "16Gi"},
                "gpuMemoryService": {"enabled": False}, "failover": {"enabled": False},
                "extraPodMetadata": {"labels": {"team": "inference"}},
                "extraPodSpec": {"mainContainer": {k: v for k, v in MAIN.items() if k != "name"}},
                "checkpoint": {"enabled": True, "mode": "Auto", "startupPolicy": "Immediate",
                               "deletionPolicy": "Delete", "targetContainerName": "main", **checkpoint},
            }}},
    }


def v1beta1(name: str = "graph", **checkpoint) -> dict:
    """The same graph in upstream's v1beta1 shape: a components list, podTemplate, experimental.checkpoint."""
    return {
        "apiVersion": "nvidia.com/v1beta1", "kind": "DynamoGraphDeployment", "metadata": {"name": name},
        "spec": {"backendFramework": "vllm", "env": [{"name": "GRAPH_LEVEL", "value": "1"}], "components": [
            {"name": "Frontend", "type": "frontend", "replicas": 1, "podTemplate": {"spec": {"containers": [
                {"name": "main", "image": "registry.example.com/frontend:1.0.0"}]}}},
            {"name": WORKER, "type": "decode", "replicas": 1, "sharedMemorySize": "16Gi",
             "podTemplate": {"metadata": {"labels": {"team": "inference"}}, "spec": {"containers": [dict(MAIN)]}},
             "experimental": {"checkpoint": {"mode": "Auto", "startupPolicy": "Immediate",
                                             "deletionPolicy": "Delete", "targetContainerName": "main",
                                             **checkpoint}}},
        ]},
    }


def apply(kubectl, namespace: str, obj: dict, *, check: bool = True):
    return kubectl.run("apply", "--validate=strict", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def get(kubectl, namespace: str, version: str, name: str = "graph") -> dict:
    resource = f"dynamographdeployments.{version}.nvidia.com"
    return json.loads(kubectl("get", resource, name, "-n", namespace, "-o", "json"))


def test_the_api_server_serves_both_upstream_versions_with_v1alpha1_stored(kubectl):
    crd = json.loads(kubectl("get", "crd", "dynamographdeployments.nvidia.com", "-o", "json"))
    versions = {v["name"]: (v["served"], v["storage"]) for v in crd["spec"]["versions"]}
    assert versions == {"v1alpha1": (True, True), "v1beta1": (True, False)}
    assert crd["spec"]["conversion"]["strategy"] == "None"


def test_an_upstream_v1alpha1_dgd_with_every_checkpoint_field_applies_strictly(kubectl, namespace):
    apply(kubectl, namespace, v1alpha1())
    stored = get(kubectl, namespace, "v1alpha1")["spec"]["services"][WORKER]
    assert stored["checkpoint"]["targetContainerName"] == "main"
    assert stored["gpuMemoryService"] == {"enabled": False, "mode": "intraPod", "deviceClassName": "gpu.nvidia.com"}


def test_an_upstream_v1beta1_dgd_applies_strictly_and_is_stored_as_written(kubectl, namespace):
    apply(kubectl, namespace, v1beta1())
    stored = get(kubectl, namespace, "v1beta1")
    assert [c["name"] for c in stored["spec"]["components"]] == ["Frontend", WORKER]
    assert stored["spec"]["components"][1]["experimental"]["checkpoint"]["targetContainerName"] == "main"


@pytest.mark.parametrize("manifest, message", [
    (v1alpha1(checkpointRef="ckpt", job={"gmsClientContainers": ["saver"]}),
     "checkpoint.job cannot be set when checkpointRef is specified"),
    (v1alpha1(mode="Manual", job={}), "checkpoint.job can only be set in Auto mode"),
    (v1alpha1(mode="Manual"), "Manual mode requires checkpointRef or identity to be set"),
    (v1alpha1(targetContainerName="Main_1"), "targetContainerName"),
    (v1alpha1(identity={"model": "m"}), "backendFramework: Required value"),
    (v1beta1(mode="Manual"), "Manual mode requires checkpointRef or identity to be set"),
    (v1beta1(enabled=True), 'unknown field "spec.components[1].experimental.checkpoint.enabled"'),
])
def test_what_upstreams_schema_refuses_is_refused_naming_the_rule(kubectl, namespace, manifest, message):
    result = apply(kubectl, namespace, manifest, check=False)
    assert result.returncode != 0 and message in result.stderr


def test_a_shape_applied_under_the_other_version_is_refused_naming_the_version(kubectl, namespace):
    beta_as_alpha = {**v1beta1(), "apiVersion": "nvidia.com/v1alpha1"}
    alpha_as_beta = {**v1alpha1(), "apiVersion": "nvidia.com/v1beta1"}
    first = apply(kubectl, namespace, beta_as_alpha, check=False)
    assert first.returncode != 0 and "apply it with apiVersion nvidia.com/v1beta1" in first.stderr
    second = apply(kubectl, namespace, alpha_as_beta, check=False)
    assert second.returncode != 0 and "apply it with apiVersion nvidia.com/v1alpha1" in second.stderr


def test_a_manual_checkpoint_without_enabled_is_accepted_as_upstream_does(kubectl, namespace):
    apply(kubectl, namespace, v1alpha1(enabled=False, mode="Manual"))


def test_both_shapes_mean_the_same_graph_to_the_operator():
    alpha, beta = v1alpha1(), v1beta1()
    alpha["spec"]["services"][WORKER].pop("gpuMemoryService")
    alpha["spec"]["services"][WORKER].pop("failover")
    alpha["spec"]["services"][WORKER].pop("subComponentType")
    alpha["spec"]["services"][WORKER]["componentType"] = "decode"
    alpha["spec"]["services"][WORKER]["sharedMemory"] = {"size": "16Gi"}
    alpha["spec"]["services"]["Frontend"]["extraPodSpec"]["mainContainer"]["name"] = "main"
    alpha["spec"]["services"][WORKER]["extraPodSpec"]["mainContainer"]["name"] = "main"
    assert as_services_shape(beta)["spec"] == alpha["spec"]


@pytest.fixture
def operator(cluster, start_operator):
    cluster.apply(agent_daemonset())
    start_operator(enabled_config())
    return cluster


def test_a_v1beta1_dgd_gets_its_automatic_checkpoint_and_status_from_the_operator(operator, kubectl, namespace):
    apply(kubectl, namespace, v1beta1())
    operator.wait_pods(f"nvidia.com/dynamo-component={WORKER}", 1)
    stored = get(kubectl, namespace, "v1beta1")
    services = as_services_shape(stored)["spec"]
    whash = worker_hash(WORKER, services["services"][WORKER], services.get("envs"))
    name = "checkpoint-" + dgd_checkpoint_id(namespace, "graph", stored["metadata"]["uid"], WORKER, whash)
    ckpt = operator.wait_created("dynamocheckpoint", name)
    assert ckpt["spec"]["job"]["targetContainerName"] == "main"
    pod = ckpt["spec"]["job"]["podTemplateSpec"]
    assert pod["metadata"]["labels"]["team"] == "inference"
    assert pod["spec"]["containers"][0]["image"] == MAIN["image"]
    assert {"name": "GRAPH_LEVEL", "value": "1"} in pod["spec"]["containers"][0]["env"]
    operator.wait("dgd.v1beta1.nvidia.com", "graph", f"{{.status.checkpoints.{WORKER}.checkpointName}}", name)


def twins() -> tuple[dict, dict]:
    """The v1beta1 graph `beta` and `alpha`, the v1alpha1 graph it means (as upstream's conversion)."""
    beta = v1beta1("beta")
    alpha = {**as_services_shape(v1beta1("alpha")), "apiVersion": "nvidia.com/v1alpha1"}
    return alpha, beta


def worker_pods(cluster, dgd: str) -> list[dict]:
    return cluster.pods_of(f"nvidia.com/dynamo-graph-deployment-name={dgd},nvidia.com/dynamo-component={WORKER}")


def is_restore_shaped(pod: dict) -> bool:
    return "nvidia.com/snapshot-checkpoint-id" in pod["metadata"].get("labels", {})


def lifecycle(cluster, kubectl, namespace: str, name: str, version: str) -> dict:
    """Play the kubelet and the agent for `name`: its cold pods Ready, its automatic checkpoint Ready, then a
    scale to 2 (through its own version) whose new pod restores. What the operator wrote, for comparing."""
    resource = f"dynamographdeployments.{version}.nvidia.com"
    eventually(lambda: len(worker_pods(cluster, name)) == 1, what=f"the cold pod of {name}")
    (cold,) = worker_pods(cluster, name)
    eventually(lambda: len(cluster.pods_of(f"nvidia.com/dynamo-graph-deployment-name={name}")) == 2,
               what=f"the frontend and worker pods of {name}")
    for pod in cluster.pods_of(f"nvidia.com/dynamo-graph-deployment-name={name}"):
        cluster.make_ready(pod["metadata"]["name"])
    stored = cluster.get(resource, name)
    services = as_services_shape(stored)["spec"]
    whash = worker_hash(WORKER, services["services"][WORKER], services.get("envs"))
    ckpt = "checkpoint-" + dgd_checkpoint_id(namespace, name, stored["metadata"]["uid"], WORKER, whash)
    job = cluster.wait_phase(ckpt, "Creating")["status"]["jobName"]
    cluster.agent_verdict(job, "completed")
    cluster.run_job_to(job)
    cluster.wait_phase(ckpt, "Ready")
    cluster.wait(resource, name, "{.status.state}", "successful")
    status = cluster.get(resource, name)["status"]
    path = "/spec/components/1/replicas" if version == "v1beta1" else f"/spec/services/{WORKER}/replicas"
    kubectl("patch", resource, name, "-n", namespace, "--type=json",
            "-p", json.dumps([{"op": "replace", "path": path, "value": 2}]))
    eventually(lambda: len(worker_pods(cluster, name)) == 2, what=f"the scale-up of {name}")
    restored = [p for p in worker_pods(cluster, name) if p["metadata"]["uid"] != cold["metadata"]["uid"]]
    (rs,) = cluster.list("replicasets", f"nvidia.com/dynamo-graph-deployment-name={name},"
                                        f"nvidia.com/dynamo-component={WORKER}")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    checkpoint = status["checkpoints"][WORKER]
    return {"state": status["state"], "ready": (ready["status"], ready["reason"], ready["message"]),
            "checkpoint": (checkpoint["checkpointName"] == ckpt, checkpoint["ready"]),
            "worker hash": rs["metadata"]["labels"]["nvidia.com/dynamo-worker-hash"],
            "replicas": rs["spec"]["replicas"], "restored": [is_restore_shaped(p) for p in restored],
            "owner": rs["metadata"]["ownerReferences"][0]["name"] == name}


def test_a_v1beta1_dgd_reaches_its_status_exactly_as_its_v1alpha1_twin(operator, kubectl, namespace):
    alpha, beta = twins()
    apply(kubectl, namespace, alpha)
    apply(kubectl, namespace, beta)
    got_alpha = lifecycle(operator, kubectl, namespace, "alpha", "v1alpha1")
    got_beta = lifecycle(operator, kubectl, namespace, "beta", "v1beta1")
    assert got_beta == got_alpha
    assert got_beta["state"] == "successful" and got_beta["checkpoint"] == (True, True)
    assert got_beta["restored"] == [True] and got_beta["replicas"] == 2
    # written through its own version: still the shape it was written in, readable as written
    assert "components" in get(kubectl, namespace, "v1beta1", "beta")["spec"]


@pytest.mark.parametrize("version, field", [
    ("v1alpha1", f"spec.services.{WORKER}.gpuMemoryService.enabled"),
    ("v1alpha1", f"spec.services.{WORKER}.failover.enabled"),
    ("v1beta1", "spec.components[1].experimental.gpuMemoryService"),
    ("v1beta1", "spec.components[1].experimental.failover"),
])
def test_gms_and_failover_are_accepted_and_refused_by_name_when_enabled(operator, kubectl, namespace, version,
                                                                        field):
    key = "failover" if "failover" in field else "gpuMemoryService"
    if version == "v1alpha1":
        manifest = v1alpha1()
        manifest["spec"]["services"][WORKER][key] = {"enabled": True}
    else:
        manifest = v1beta1()
        manifest["spec"]["components"][1]["experimental"][key] = {"mode": "IntraPod"}
    apply(kubectl, namespace, manifest)
    # the failed status is written through the DGD's own version: the other one's schema refuses its shape
    operator.wait(f"dgd.{version}.nvidia.com", "graph", "{.status.state}", "failed")
    ready = next(c for c in operator.get(f"dgd.{version}.nvidia.com", "graph")["status"]["conditions"]
                 if c["type"] == "Ready")
    assert f"{field}: " in ready["message"] and f"is not supported by dynamo-snapshot (component {WORKER})" \
        in ready["message"]
    assert not json.loads(kubectl("get", "replicasets", "-n", namespace, "-o", "json"))["items"]


def test_a_checkpoint_job_is_accepted_and_refused_by_name_when_checkpointing(operator, kubectl, namespace):
    apply(kubectl, namespace, v1alpha1(job={"podTemplate": {"spec": {"containers": [{"name": "gms-saver"}]}}}))
    operator.wait("dgd.v1alpha1.nvidia.com", "graph", "{.status.state}", "failed")
    ready = next(c for c in operator.get("dgd.v1alpha1.nvidia.com", "graph")["status"]["conditions"]
                 if c["type"] == "Ready")
    assert f"spec.services.{WORKER}.checkpoint.job: GMS + Snapshot" in ready["message"]


def test_a_v1alpha1_object_is_readable_through_v1beta1_unconverted(kubectl, namespace):
    apply(kubectl, namespace, copy.deepcopy(v1alpha1()))
    through_beta = get(kubectl, namespace, "v1beta1")
    assert through_beta["apiVersion"] == "nvidia.com/v1beta1" and WORKER in through_beta["spec"]["services"]
