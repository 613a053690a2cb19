"""Installed in podMount mode, the way a cluster with one agent for every namespace installs it: the
snapshot chart once, in its own namespace (the cluster-wide agent: the chart's ClusterRole, and its
ValidatingAdmissionPolicy required), the operator chart with its podMount storage settings (it creates the
workload namespace's checkpoint PVC), and a PersistentVolume pre-bound to that claim. The CPU
checkpoint/restore flow then runs through them with only what the charts grant - so it shows that the
policy lets through every write the agent needs (annotations of checkpoint pods and Jobs, its Leases, its
Events), while it refuses the agent's writes to other objects."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent.artifact import layout, verification
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container.criu import CriuBundle
from dynamo_snapshot.agent.service import main as agent_main
from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster import installed
from dynamo_snapshot.devcluster.scenarios import Flow, checkpoint_manifest, component_selector, dgd_manifest
from dynamo_snapshot.devcluster.stack import SnapshotStack
from dynamo_snapshot.kube import PODS, ApiError, Client, PatchType

pytestmark = pytest.mark.e2e

INSTALLED = True
STORAGE_MODE = "podMount"

REFUSED = "the snapshot agent may change only checkpoint objects"


def agent_pod(stack: SnapshotStack) -> dict:
    (pod,) = json.loads(stack.kubectl("get", "pods", "-n", installed.AGENT_NAMESPACE, "-l", installed.AGENT_SELECTOR,
                                      "-o", "json"))["items"]
    return pod


def agent_user(stack: SnapshotStack) -> str:
    return f"system:serviceaccount:{installed.AGENT_NAMESPACE}:{agent_pod(stack)['spec']['serviceAccountName']}"


def patch_as_agent(kubeconfig: Path, namespace: str, pod: str) -> str | None:
    """A write the agent's ClusterRole allows on every pod (a merge patch; kubectl would get the pod first,
    which the agent may not), made as the agent's ServiceAccount and not persisted (dry run). The refusal,
    or None when it was let through."""
    patch = {"metadata": {"annotations": {"e2e.dynamo-snapshot.dev/probe": "1"}}}

    async def attempt() -> str | None:
        async with Client.from_config(str(kubeconfig)) as client:
            try:
                await client.request("PATCH", PODS.path(namespace, pod), params={"dryRun": "All"}, body=patch,
                                     content_type=str(PatchType.MERGE))
            except ApiError as err:
                return str(err)
        return None

    return anyio.run(attempt)


def wait_policy_enforced(stack: SnapshotStack) -> str:
    """The API server loads a new policy asynchronously: wait (bounded) until it refuses the agent's patch
    of a pod without a checkpoint ID (the operator's); returns the refusal."""
    assert stack.cluster is not None
    kubeconfig = stack.cluster.kubeconfig_for(agent_user(stack))  # the agent's identity: RBAC applies
    operator = json.loads(stack.kubectl("get", "pods", "-n", installed.OPERATOR_NAMESPACE, "-l",
                                        installed.OPERATOR_SELECTOR, "-o", "json"))["items"][0]["metadata"]["name"]
    return stack.wait_until(lambda: patch_as_agent(kubeconfig, installed.OPERATOR_NAMESPACE, operator),
                            "the agent's admission policy to refuse a patch of an unlabelled pod", 60)


def test_the_cluster_wide_agent_runs_once_in_its_own_namespace_under_the_charts_cluster_role_and_policy(flow: Flow):
    stack = flow.stack
    agent = agent_pod(stack)
    assert all(c["ready"] for c in agent["status"]["containerStatuses"])
    command = agent["spec"]["containers"][0]["command"]
    assert "--storage-access-mode=podMount" in command and "--namespace-restricted" not in command
    # podMount: the agent mounts no checkpoint PVC, and the chart created none
    assert not [v for v in agent["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert json.loads(stack.kubectl("get", "pvc", "-n", installed.AGENT_NAMESPACE, "-o", "json"))["items"] == []
    user = agent_user(stack)
    bindings = json.loads(stack.kubectl("get", "clusterrolebindings", "-l", installed.AGENT_SELECTOR,
                                        "-o", "json"))["items"]
    assert [b for b in bindings if b["subjects"] == [{"kind": "ServiceAccount", "name": user.rsplit(":", 1)[1],
                                                      "namespace": installed.AGENT_NAMESPACE}]]
    # the chart's ValidatingAdmissionPolicyBinding is there, denying, and its policy matches this agent
    (binding,) = json.loads(stack.kubectl("get", "validatingadmissionpolicybindings", "-l",
                                          f"app.kubernetes.io/instance={installed.SNAPSHOT_RELEASE},"
                                          f"{installed.AGENT_SELECTOR}", "-o", "json"))["items"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    policy = json.loads(stack.kubectl("get", "validatingadmissionpolicy", binding["spec"]["policyName"], "-o", "json"))
    assert [c for c in policy["spec"]["matchConditions"] if f"'{user}'" in c["expression"]]
    # and it is enforced: RBAC lets the agent patch any pod, the policy only a checkpoint's
    assert REFUSED in wait_policy_enforced(stack)


def test_a_checkpoint_and_a_restore_run_through_the_cluster_wide_agent_under_its_admission_policy(flow: Flow):
    stack = flow.stack
    wait_policy_enforced(stack)  # the writes below are made under the policy, not before it is loaded
    run = flow.create_checkpoint(checkpoint_manifest("installed-pod-mount"))
    # the operator created the workload namespace's claim, bound to the admin's PersistentVolume
    pvc = stack.get("pvc", installed.PVC_NAME)
    assert pvc["metadata"]["labels"][names.LABEL_APP_COMPONENT] == names.STORAGE_COMPONENT
    assert pvc["spec"]["volumeName"] == f"{stack.namespace}-{installed.PVC_NAME}"
    source = stack.get("pod", run.source_pod)
    assert source["metadata"]["annotations"][names.ANN_STORAGE_BASE_PATH] == installed.POD_BASE_PATH
    # the agent's patch of the checkpoint Job (labelled) passed the policy
    assert stack.get("job", run.job)["metadata"]["annotations"][names.ANN_CHECKPOINT_STATUS] == "completed"
    here = artifact.Compatibility.of_this_node(CriuBundle.locate().version())
    verification.verify(layout.ArtifactLayout(stack.checkpoints, run.checkpoint_id).final_dir, run.checkpoint_id, here)

    started = time.time()
    stack.apply(dgd_manifest("restored-pod-mount", replicas=1, checkpoint_ref="installed-pod-mount"))
    (restored,) = flow.wait_restored(component_selector("restored-pod-mount"), 1, started)
    assert restored.instance == run.instance and restored.heap_ok
    (pod,) = flow.pods(component_selector("restored-pod-mount"))
    assert pod["metadata"]["annotations"][names.restore_status_annotation("main")] == "completed"
    assert [r for r in stack.agent_events("restore completed") if r.get("name") == restored.name]
    # its Events passed the policy too (its own reporting controller), and nothing it asked for was refused
    events = json.loads(stack.kubectl("get", "events.events.k8s.io", "-n", stack.namespace, "-o", "json"))["items"]
    assert {"CheckpointCompleted", "Restored"} <= {e["reason"] for e in events
                                                   if e.get("reportingController") == agent_main.EVENT_CONTROLLER}
    assert "the snapshot agent may" not in stack.agent_log_text()
