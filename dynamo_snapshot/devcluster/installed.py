"""The stack's installed mode: the operator and the agent run from their images, installed with Helm the
way the user guide installs them, instead of as local processes.

1. ``archives``: the agent and operator images (hack/images/python_images.py, no Docker) beside the
   node's pause and placeholder images, imported into the node's containerd under the names the charts
   default to (``dynamo-snapshot-{agent,operator}:<appVersion>``);
2. ``install``, once the node is Ready:
   a. what a cluster admin provides: a hostPath PersistentVolume pre-bound to the snapshot chart's
      checkpoint claim (static provisioning: this cluster has no storage provisioner);
   b. ``helm install`` of the operator chart into its own namespace (cluster-wide, leader election,
      probes, metrics, the chart's ClusterRole) and of the snapshot chart into the workload namespace
      (the DaemonSet: privileged, hostPID, the node's CRI socket, the checkpoint PVC), each with a
      values file as a user writes it, ``--wait`` for both to be Ready;
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
OPERATOR_RELEASE = "dynamo-snapshot"
SNAPSHOT_RELEASE = "snapshot"
AGENT_SELECTOR = "app.kubernetes.io/component=snapshot-agent"
OPERATOR_SELECTOR = "app.kubernetes.io/instance=" + OPERATOR_RELEASE
PVC_NAME = "snapshot-pvc"


def helm_binary() -> Path:
    """The helm that hack/build-helm.sh builds (a no-op when cached); it prints the binary's path."""
    result = subprocess.run([str(HELM_BUILDER)], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"hack/build-helm.sh failed: {result.stderr.strip()[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def archives(workdir: Path) -> list[Path]:
    return list(images.python_builder().build(workdir / "python").values())


def operator_values() -> dict[str, Any]:
    return {"checkpoint": {"enabled": True,
                           # no registry: the cleanup Jobs run the local placeholder image (it has rm)
                           "cleanupImage": images.PLACEHOLDER_IMAGE}}


def snapshot_values(stack: SnapshotStack) -> dict[str, Any]:
    assert stack.node is not None
    return {"storage": {"pvc": {"size": "10Gi"}},
            "runtime": {"socketPath": str(stack.node.cri_socket)},
            # this node's kubelet runs with its own --root-dir: its seccomp root, not the machine's
            "seccomp": {"hostPath": str(stack.node.kubelet_root / "seccomp")},
            "config": {"criu": {"timeoutSeconds": 300}}}


def _volume(stack: SnapshotStack) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{stack.namespace}-{PVC_NAME}"},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "hostPath": {"path": str(stack.checkpoints), "type": "Directory"},
                     "claimRef": {"namespace": stack.namespace, "name": PVC_NAME}}}


def install(stack: SnapshotStack) -> None:
    assert stack.cluster is not None
    helm = helm_binary()
    stack.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(_volume(stack)))

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

    helm_install(OPERATOR_RELEASE, "operator", OPERATOR_NAMESPACE, operator_values())
    helm_install(SNAPSHOT_RELEASE, "snapshot", stack.namespace, snapshot_values(stack))
    # helm --wait counts a rollout done with maxUnavailable pods not ready (here: all of them)
    for namespace, workload in ((OPERATOR_NAMESPACE, f"deployment/{OPERATOR_RELEASE}-operator"),
                                (stack.namespace, f"daemonset/{SNAPSHOT_RELEASE}-agent")):
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
    return _pod_logs(stack, stack.namespace, f"{SNAPSHOT_RELEASE}-agent-", "agent")


def operator_log(stack: SnapshotStack) -> str:
    return _pod_logs(stack, OPERATOR_NAMESPACE, f"{OPERATOR_RELEASE}-operator-", "operator")


def restart_agent(stack: SnapshotStack) -> None:
    """Delete the agent's pod (``kill``: without a grace period); the DaemonSet starts a new one."""
    stack.kubectl("delete", "pod", "-n", stack.namespace, "-l", AGENT_SELECTOR, "--grace-period=0", "--wait=true")
    stack.kubectl("rollout", "status", "-n", stack.namespace, f"daemonset/{SNAPSHOT_RELEASE}-agent", "--timeout=180s",
                  timeout=200)


def diagnostics(stack: SnapshotStack) -> str:
    """The pods of both releases and their recent events, for a failed install."""
    parts = []
    for namespace in (OPERATOR_NAMESPACE, stack.namespace):
        parts.append(stack.kubectl("get", "pods,pvc", "-n", namespace, "-o", "wide", check=False))
        parts.append(stack.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)[-3000:])
    parts.append("--- agent ---\n" + agent_log(stack)[-3000:])
    parts.append("--- operator ---\n" + operator_log(stack)[-3000:])
    return "\n".join(parts)
