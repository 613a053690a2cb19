"""Installed the way users install it: the agent and operator images (built without Docker) imported into
the node, both charts installed with Helm, the operator running as its Deployment and the agent as the
DaemonSet's pod on the real kubelet - with only the RBAC the charts grant. The CPU checkpoint/restore
flow then runs through them."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from dynamo_snapshot.agent.artifact import layout, verification
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container.criu import CriuBundle
from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster import installed
from dynamo_snapshot.devcluster.scenarios import Flow, checkpoint_manifest, component_selector, dgd_manifest

pytestmark = pytest.mark.e2e

INSTALLED = True


def pods(flow: Flow, namespace: str, selector: str) -> list[dict]:
    return json.loads(flow.stack.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))["items"]


def metrics(pod: dict, port: int) -> str:
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_the_charts_run_the_operator_as_a_deployment_and_the_agent_as_a_daemonset(flow: Flow):
    stack = flow.stack
    (operator,) = pods(flow, installed.OPERATOR_NAMESPACE, installed.OPERATOR_SELECTOR)
    (agent,) = pods(flow, stack.namespace, installed.AGENT_SELECTOR)
    for pod in (operator, agent):
        assert all(c["ready"] for c in pod["status"]["containerStatuses"])  # the charts' readiness probes
        assert pod["spec"]["nodeName"] == stack.node.name
    assert agent["spec"]["hostPID"] is True
    assert agent["spec"]["containers"][0]["securityContext"]["privileged"] is True
    assert operator["spec"]["securityContext"]["runAsUser"] == 65532
    # the operator won its leader election Lease in its own namespace
    leases = json.loads(stack.kubectl("get", "leases", "-n", installed.OPERATOR_NAMESPACE, "-o", "json"))["items"]
    assert [lease["spec"]["holderIdentity"] for lease in leases if operator["metadata"]["name"]
            in lease["spec"].get("holderIdentity", "")]
    # the cluster-wide operator runs under the chart's admission policy (owned objects only), so the
    # checkpoint and restore below show that the policy lets through everything the operator needs
    bindings = json.loads(stack.kubectl("get", "validatingadmissionpolicybindings", "-o", "json"))["items"]
    assert [b for b in bindings if b["metadata"].get("labels", {}).get("app.kubernetes.io/instance")
            == installed.OPERATOR_RELEASE and b["spec"]["validationActions"] == ["Deny"]]
    # both serve their metrics on the pod network
    assert "# TYPE" in metrics(operator, 8080)
    assert "# TYPE" in metrics(agent, 9090)


def test_a_checkpoint_and_a_restore_run_through_the_installed_operator_and_agent(flow: Flow):
    stack = flow.stack
    run = flow.create_checkpoint(checkpoint_manifest("installed"))
    job = stack.get("job", run.job)
    assert job["metadata"]["annotations"][names.ANN_CHECKPOINT_STATUS] == "completed"
    here = artifact.Compatibility.of_this_node(CriuBundle.locate().version())
    verification.verify(layout.ArtifactLayout(stack.checkpoints, run.checkpoint_id).final_dir, run.checkpoint_id, here)

    started = time.time()
    stack.apply(dgd_manifest("restored", replicas=1, checkpoint_ref="installed"))
    (restored,) = flow.wait_restored(component_selector("restored"), 1, started)
    assert restored.instance == run.instance and restored.heap_ok
    (pod,) = flow.pods(component_selector("restored"))
    assert pod["metadata"]["annotations"][names.restore_status_annotation("main")] == "completed"
    # the agent pod's own log tells the restore, as the local agent's does
    assert [r for r in stack.agent_events("restore completed") if r.get("name") == restored.name]
