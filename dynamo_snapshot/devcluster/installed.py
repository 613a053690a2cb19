"""The stack's installed mode: the operator and the agent run from their images, installed with Helm the
way the user guide installs them, instead of as local processes - in the stack's storage mode, agentMount
or podMount.

1. ``archives``: the agent and operator images (hack/images/python_images.py, no Docker) beside the
   node's pause and placeholder images, imported into the node's containerd under the names the charts
   default to (``dynamo-snapshot-{agent,operator}:<appVersion>``);
2. ``install``, once the node is Ready:
   a. what a cluster admin provides: the workload namespace and a hostPath PersistentVolume pre-bound to
      its checkpoint claim (static provisioning: this cluster has no storage provisioner);
   b. ``helm install`` of the operator chart into its own namespace (cluster-wide, leader election,
      probes, metrics, the chart's ClusterRole and admission policy) and of the snapshot chart (the
      DaemonSet: privileged, hostPID, the node's CRI socket), each with a values file as a user writes it,
      ``--wait`` for both to be Ready:
      - agentMount: the snapshot chart in the workload namespace, creating the claim and mounting it
        into the agent (a namespace-restricted agent, a Role);
      - podMount: the snapshot chart once, in its own namespace (``AGENT_NAMESPACE``): the cluster-wide
        agent with the chart's ClusterRole and its ValidatingAdmissionPolicy required; the operator
        creates the workload namespace's claim (``checkpoint.storage.pvc.create``) and only the workload
        pods mount it;
3. the agent's log is its pod's log (the kubelet's files), a restart of the agent deletes its pod.

RBAC is what the charts grant: nothing is added, so a missing permission fails the flow.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dynamo_snapshot.devcluster import images

if TYPE_CHECKING:
    from dynamo_snapshot.devcluster.stack import SnapshotStack

REPO = Path(__file__).resolve().parents[2]
HELM_BUILDER = REPO / "hack" / "build-helm.sh"
OPERATOR_NAMESPACE = "dynamo-snapshot-system"
AGENT_NAMESPACE = "dynamo-snapshot-agent"  # podMount: the cluster-wide agent's own namespace
OPERATOR_RELEASE = "dynamo-snapshot"
SNAPSHOT_RELEASE = "snapshot"
AGENT_SELECTOR = "app.kubernetes.io/component=snapshot-agent"
OPERATOR_SELECTOR = "app.kubernetes.io/instance=" + OPERATOR_RELEASE
PVC_NAME = "snapshot-pvc"
POD_BASE_PATH = "/checkpoints"  # podMount: where the workload pods mount the claim (both charts' default)
PVC_SIZE = "10Gi"
INSTALLED_MODES = ("agentMount", "podMount")  # SnapshotStack refuses the others


def pod_mount(stack: SnapshotStack) -> bool:
    return stack.storage_mode == "podMount"


def agent_namespace(stack: SnapshotStack) -> str:
    """Where the snapshot chart is installed: the workload namespace (agentMount), or its own (podMount)."""
    return AGENT_NAMESPACE if pod_mount(stack) else stack.namespace


def helm_binary() -> Path:
    """The helm that hack/build-helm.sh builds (a no-op when cached); it prints the binary's path."""
    result = subprocess.run([str(HELM_BUILDER)], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"hack/build-helm.sh failed: {result.stderr.strip()[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def archives(workdir: Path) -> list[Path]:
    return list(images.python_builder().build(workdir / "python").values())


def operator_values(stack: SnapshotStack) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {"enabled": True,
                                  # no registry: the cleanup Jobs run the local placeholder image (it has rm)
                                  "cleanupImage": images.PLACEHOLDER_IMAGE}
    if pod_mount(stack):  # the operator owns each workload namespace's claim
        checkpoint["storage"] = {"type": "pvc", "accessMode": "podMount", "pvc": {
            "pvcName": PVC_NAME, "basePath": POD_BASE_PATH, "create": True, "size": PVC_SIZE,
            "storageClassName": "", "accessMode": "ReadWriteMany"}}
    return {"checkpoint": checkpoint}


def snapshot_values(stack: SnapshotStack) -> dict[str, Any]:
    assert stack.node is not None
    values: dict[str, Any] = {
        "storage": {"pvc": {"size": PVC_SIZE}},
        "runtime": {"socketPath": str(stack.node.cri_socket)},
        # this node's kubelet runs with its own --root-dir: its seccomp root, not the machine's
        "seccomp": {"hostPath": str(stack.node.kubelet_root / "seccomp")},
        "config": {"criu": {"timeoutSeconds": 300}}}
    if pod_mount(stack):  # the chart's defaults for podMount (a ClusterRole), the label policy required
        values["storage"] = {"accessMode": "podMount", "pvc": {"basePath": POD_BASE_PATH}}
        values["admissionPolicy"] = {"checkpointObjectsOnly": True}
    return values


def _admin_objects(stack: SnapshotStack) -> list[dict[str, Any]]:
    """The workload namespace and the PersistentVolume of its checkpoint claim (whoever creates the claim)."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": stack.namespace}}
    return [namespace, _volume(stack)]


def _volume(stack: SnapshotStack) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{stack.namespace}-{PVC_NAME}"},
            "spec": {"capacity": {"storage": PVC_SIZE}, "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "hostPath": {"path": str(stack.checkpoints), "type": "Directory"},
                     "claimRef": {"namespace": stack.namespace, "name": PVC_NAME}}}


def install(stack: SnapshotStack) -> None:
    assert stack.cluster is not None
    helm = helm_binary()
    stack.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_admin_objects(stack)))

    def helm_install(release: str, chart: str, namespace: str, values: dict[str, Any]) -> None:
        assert stack.cluster is not None
        values_file = stack.root / f"{release}-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        result = subprocess.run(
            [str(helm), "install", release, str(REPO / "helm" / chart), "--namespace", namespace,
             "--create-namespace", "--values", str(values_file), "--wait", "--timeout", "5m",
             f"--kubeconfig={stack.cluster.kubeconfig}"],
            capture_output=True, text=True, timeout=400)
        if result.returncode != 0:
            raise RuntimeError(f"helm install {release} failed: {result.stderr.strip()}\n{diagnostics(stack)}")

    helm_install(OPERATOR_RELEASE, "operator", OPERATOR_NAMESPACE, operator_values(stack))
    helm_install(SNAPSHOT_RELEASE, "snapshot", agent_namespace(stack), snapshot_values(stack))
    # helm --wait counts a rollout done with maxUnavailable pods not ready (here: all of them)
    for namespace, workload in ((OPERATOR_NAMESPACE, f"deployment/{OPERATOR_RELEASE}-operator"),
                                (agent_namespace(stack), f"daemonset/{SNAPSHOT_RELEASE}-agent")):
        result = subprocess.run([str(stack.cluster.bin / "kubectl"), f"--kubeconfig={stack.cluster.kubeconfig}",
                                 "rollout", "status", "-n", namespace, workload, "--timeout=180s"],
                                capture_output=True, text=True, timeout=200)
        if result.returncode != 0:
            raise RuntimeError(f"{workload} is not ready: {result.stderr.strip()}\n{diagnostics(stack)}")


def _pod_logs(stack: SnapshotStack, namespace: str, pod_prefix: str, container: str) -> str:
    """What the containers of the matching pods wrote, every restart in order, from the kubelet's log
    files (CRI format: ``<time> <stream> <tag> <line>``)."""
    assert stack.node is not None
    files = sorted(stack.node.pod_logs.glob(f"{namespace}_{pod_prefix}*/{container}/*.log"),
                   key=lambda f: f.stat().st_mtime)
    lines = []
    for log_file in files:
        for line in log_file.read_text(errors="replace").splitlines():
            parts = line.split(" ", 3)
            lines.append(parts[3] if len(parts) == 4 else line)
    return "\n".join(lines)


def agent_log(stack: SnapshotStack) -> str:
    return _pod_logs(stack, agent_namespace(stack), f"{SNAPSHOT_RELEASE}-agent-", "agent")


def operator_log(stack: SnapshotStack) -> str:
    return _pod_logs(stack, OPERATOR_NAMESPACE, f"{OPERATOR_RELEASE}-operator-", "operator")


def restart_agent(stack: SnapshotStack) -> None:
    """Delete the agent's pod (``kill``: without a grace period); the DaemonSet starts a new one."""
    namespace = agent_namespace(stack)
    stack.kubectl("delete", "pod", "-n", namespace, "-l", AGENT_SELECTOR, "--grace-period=0", "--wait=true")
    stack.kubectl("rollout", "status", "-n", namespace, f"daemonset/{SNAPSHOT_RELEASE}-agent", "--timeout=180s",
                  timeout=200)


def diagnostics(stack: SnapshotStack) -> str:
    """The pods of both releases and their recent events, for a failed install."""
    parts = []
    for namespace in dict.fromkeys((OPERATOR_NAMESPACE, agent_namespace(stack), stack.namespace)):
        parts.append(stack.kubectl("get", "pods,pvc", "-n", namespace, "-o", "wide", check=False))
        parts.append(stack.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)[-3000:])
    parts.append("--- agent ---\n" + agent_log(stack)[-3000:])
    parts.append("--- operator ---\n" + operator_log(stack)[-3000:])
    return "\n".join(parts)
