"""Pre-staging in a real operator process on a real API server: a Ready checkpoint that a DGD generation
restores from lists, in `status.staging`, the nodes where such pods can run (capped), and the nodes whose
agent reports it staged; nothing restoring from it and nobody holding it leaves no staging at all."""

from __future__ import annotations

import json

import pytest

from dynamo_snapshot.api import names
from tests.controllers.support import agent_daemonset, checkpoint_manifest, eventually

pytestmark = pytest.mark.integration

# every fake node carries it: no pod of the control plane's other tests lands on them
FAKE_TAINT = {"key": "test.dynamo-snapshot/fake-node", "value": "true", "effect": "NoSchedule"}


@pytest.fixture
def nodes(kubectl, namespace):
    """Nodes with no kubelet (Ready by a status patch), deleted afterwards."""
    made: list[str] = []

    def make(suffix: str, labels: dict[str, str], taints: list[dict] = ()) -> str:
        name = f"{namespace}-{suffix}"[:63]
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
                "spec": {"taints": [FAKE_TAINT, *taints]}}
        kubectl("create", "-f", "-", input=json.dumps(node))
        made.append(name)
        status = {"status": {"allocatable": {names.RESOURCE_GPU: "8", "cpu": "8", "memory": "64Gi", "pods": "110"},
                             "capacity": {names.RESOURCE_GPU: "8", "cpu": "8", "memory": "64Gi", "pods": "110"},
                             "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                             "message": "test"}]}}
        kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))
        return name

    yield make
    for name in made:
        kubectl.run("delete", "node", name, "--wait=false", check=False)


def restore_replicaset(checkpoint_id: str, node_selector: dict[str, str]) -> dict:
    """A DGD generation's ReplicaSet whose pods restore `checkpoint_id` (as the DGD controller shapes it)."""
    labels = {names.LABEL_DGD_NAME: "graph", names.LABEL_COMPONENT: "worker", names.LABEL_CHECKPOINT_ID: checkpoint_id}
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "graph-worker-restore", "labels": {names.LABEL_DGD_NAME: "graph"}},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "nodeSelector": node_selector,
                         "tolerations": [{"key": FAKE_TAINT["key"], "operator": "Exists"}],
                         "containers": [{"name": "main", "image": "placeholder:1",
                                         "resources": {"limits": {names.RESOURCE_GPU: "1"}}}]}}}}


def staged_lease(node: str, entries: list[dict[str, str]]) -> dict:
    """What a node's agent writes in its namespace after staging (agent/service/staging.py)."""
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": names.STAGED_LEASE_PREFIX + node,
                         "labels": {names.LABEL_STAGED_NODE: node, names.LABEL_CHECKPOINT_ID: ""},
                         "annotations": {names.ANN_STAGED: json.dumps(entries)}},
            "spec": {"holderIdentity": f"snapshot-agent-{node}"}}


def staging(cluster, name: str) -> dict | None:
    return cluster.get("dynamocheckpoints", name).get("status", {}).get("staging")


def ready_checkpoint(cluster, name: str) -> str:
    cluster.apply(checkpoint_manifest(name))
    ckpt = cluster.wait_phase(name, "Creating")
    cluster.agent_verdict(ckpt["status"]["jobName"], "completed")
    cluster.run_job_to(ckpt["status"]["jobName"])
    return cluster.wait_phase(name, "Ready")["status"]["checkpointID"]


def test_a_ready_checkpoint_a_generation_restores_from_is_staged_on_nodes_its_pods_fit(cluster, start_operator,
                                                                                         nodes):
    a = nodes("a", {"pool": "gpu"})
    b = nodes("b", {"pool": "gpu"})
    nodes("c", {"pool": "gpu"}, [{"key": "maintenance", "value": "yes", "effect": "NoExecute"}])
    nodes("d", {"pool": "cpu"})
    e = nodes("e", {"pool": "gpu"})
    cluster.apply(agent_daemonset())
    start_operator({"checkpoint": {"enabled": True, "staging": {"maxNodes": 2}}})
    checkpoint_id = ready_checkpoint(cluster, "ckpt")
    assert staging(cluster, "ckpt") is None, "nothing restores from it yet"

    cluster.apply(restore_replicaset(checkpoint_id, {"pool": "gpu"}))
    eventually(lambda: (staging(cluster, "ckpt") or {}).get("nodes") == sorted([a, b]), what="staging nodes")
    assert staging(cluster, "ckpt")["artifactVersion"] == "1"
    assert e not in staging(cluster, "ckpt")["nodes"], "capped at checkpoint.staging.maxNodes"

    cluster.apply(staged_lease(b, [{"checkpointID": checkpoint_id, "version": "1"},
                                   {"checkpointID": "other", "version": "1"}]))
    eventually(lambda: (staging(cluster, "ckpt") or {}).get("staged") == [b], what="the agent's report copied")

    cluster.kubectl("delete", "replicaset", "graph-worker-restore", "-n", cluster.namespace)
    eventually(lambda: (staging(cluster, "ckpt") or {}).get("nodes", []) == [], what="no more staging nodes")
    assert staging(cluster, "ckpt")["staged"] == [b], "what is staged stays visible while a node holds it"

    cluster.apply(staged_lease(b, []))
    eventually(lambda: staging(cluster, "ckpt") is None, what="staging gone")


def test_with_staging_off_the_operator_writes_no_staging(cluster, start_operator, nodes):
    nodes("a", {"pool": "gpu"})
    cluster.apply(agent_daemonset())
    start_operator({"checkpoint": {"enabled": True, "staging": {"maxNodes": 0}}})
    checkpoint_id = ready_checkpoint(cluster, "ckpt")
    cluster.apply(restore_replicaset(checkpoint_id, {"pool": "gpu"}))
    cluster.apply(checkpoint_manifest("second", model="other"))  # by now the operator looked at the first again
    cluster.wait_phase("second", "Creating")
    assert staging(cluster, "ckpt") is None


def test_a_dgd_generation_restoring_from_a_checkpoint_ref_gets_it_staged_where_its_workers_fit(
        cluster, start_operator, nodes):
    gpu_pool = nodes("gpu", {"pool": "gpu"})
    nodes("cpu", {"pool": "cpu"})
    cluster.apply(agent_daemonset())
    start_operator({"checkpoint": {"enabled": True}})
    ready_checkpoint(cluster, "shared")
    worker = {"componentType": "worker", "replicas": 0, "resources": {"limits": {"gpu": "1"}},
              "extraPodSpec": {"nodeSelector": {"pool": "gpu"},
                               "tolerations": [{"key": FAKE_TAINT["key"], "operator": "Exists"}],
                               "mainContainer": {"image": "placeholder:1", "command": ["python3", "-m", "w"]}},
              "checkpoint": {"enabled": True, "checkpointRef": "shared", "startupPolicy": "Immediate"}}
    cluster.apply({"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment",
                   "metadata": {"name": "graph"},
                   "spec": {"backendFramework": "vllm", "services": {"VllmDecodeWorker": worker}}})
    eventually(lambda: (staging(cluster, "shared") or {}).get("nodes") == [gpu_pool],
               what="staged where the DGD's restore pods fit")
