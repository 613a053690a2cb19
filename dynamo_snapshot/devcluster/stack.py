"""The whole system on one machine, all real: the local control plane, a kubelet node on containerd,
the operator and the snapshot agent as local processes (the demo, the end-to-end tests and
bench/e2e.py run on it).

    with SnapshotStack(Path(".local/stack")).running() as stack:
        stack.kubectl("apply", "-n", stack.namespace, "-f", "checkpoint.yaml")
        stack.wait_object(DYNAMO_CHECKPOINTS, "counter", lambda c: c.get("status", {}).get("phase"), "a verdict")

What stands in for the Helm charts: the agent runs with the snapshot chart's command line and RBAC
(a Role in the namespace, bound to the ServiceAccount ``snapshot-agent``, whose name its client
certificate carries), and in agentMount mode a DaemonSet object describes it to the operator (the
operator discovers checkpoint storage from it) without running any pod (its node selector matches no
node). In podMount mode the namespace gets a hostPath PersistentVolume bound to ``snapshot-pvc``, which
the workload pods mount at the base path, and the agent reaches it through them. In s3 mode a MinIO on
loopback (``devcluster/minio.py``) holds the checkpoints in bucket ``S3_BUCKET`` under ``S3_PREFIX``: the
operator is configured for it (no PVC, no DaemonSet), the agent too, with a node-local ``objects/``
directory (checkpoints before their upload), a node cache ``node-cache/`` (restores fetch into it) and
its keys as files (the chart's Secret).

``node_cache_gib`` gives the agent a node cache in any mode (``node-cache/`` under the root, that budget:
the chart's ``cache.hostPath`` and ``cache.budgetGiB``; s3 has one of ``S3_CACHE_GIB`` without it) and
its Role the chart's read-only watch of DynamoCheckpoints; ``staging_max_nodes`` sets the operator's
``checkpoint.staging.maxNodes`` (None: its default).

``installed=True`` replaces all of that with the real thing (``devcluster/installed.py``): the agent and
operator images imported into the node, both charts installed with Helm, the operator as its Deployment
and the agent as the DaemonSet's pod on the kubelet (agentMount).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import yaml

from dynamo_snapshot.devcluster import images, installed, minio
from dynamo_snapshot.devcluster.cluster import ClusterError, Component, LocalCluster, _free_port, install_crds
from dynamo_snapshot.devcluster.node import KubeletNode
from dynamo_snapshot.kube import Client, Informer, Resource

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "helm" / "operator" / "crds"
AGENT = "snapshot-agent"
PVC_NAME = installed.PVC_NAME
POD_BASE_PATH = installed.POD_BASE_PATH  # where pods mount the checkpoint PVC (podMount); what the operator records
S3_BUCKET, S3_PREFIX = "checkpoints", "stack"  # s3 mode
STORAGE_MODES = ("agentMount", "podMount", "s3")
INSTALLED_MODES = installed.INSTALLED_MODES

# The snapshot chart's agent Role (helm/snapshot/templates/rbac.yaml); tests/helm checks they agree.
AGENT_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "patch"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "delete"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
# ... with the node cache on (the chart's cache.hostPath; always with s3): the watch of DynamoCheckpoints
CACHE_RULES = [{"apiGroups": ["nvidia.com"], "resources": ["dynamocheckpoints"], "verbs": ["list", "watch"]}]
S3_CACHE_GIB = 4  # s3's node cache budget unless node_cache_gib says otherwise


class SnapshotStack:
    def __init__(self, root: Path, *, namespace: str = "dynamo-demo", storage_mode: str = "agentMount",
                 extra_image_files: dict[str, Path] | None = None, criu_config: dict[str, Any] | None = None,
                 installed: bool = False, gpu_plugin: list[str] | None = None, node_cache_gib: float = 0,
                 staging_max_nodes: int | None = None):
        if storage_mode not in STORAGE_MODES:
            raise ValueError(f"storage_mode {storage_mode!r} is not one of {', '.join(STORAGE_MODES)}")
        if installed and storage_mode not in INSTALLED_MODES:
            raise ValueError(f"installed=True runs the charts in {' or '.join(INSTALLED_MODES)} mode, "
                             f"not {storage_mode}: use installed=False for {storage_mode}")
        if installed and node_cache_gib:
            raise ValueError("node_cache_gib configures the local agent process; installed=True runs the chart's "
                             "(set its cache.hostPath and cache.budgetGiB there)")
        self.installed = installed
        self.root = Path(root).resolve()
        self.gpu_plugin = gpu_plugin  # the node offers nvidia.com/gpu through devcluster/gpu_plugin.py
        self.namespace = namespace
        self.storage_mode = storage_mode
        self.extra_image_files = extra_image_files or {}
        # nftables: the CI machines have no iptables; CRIU's default network lock needs it.
        self.criu_config = criu_config or {"networkLock": "nftables", "timeoutSeconds": 300}
        self.checkpoints = self.root / "checkpoints"  # agentMount: the agent's mount; podMount: the PV's data
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.objects = self.root / "objects"  # s3: the agent's node-local directory (checkpoints before upload)
        self.node_cache = self.root / "node-cache"  # the agent's cache.dir (s3: where restores fetch into)
        self.node_cache_gib = node_cache_gib or (S3_CACHE_GIB if storage_mode == "s3" else 0)  # 0: no cache
        self.staging_max_nodes = staging_max_nodes
        self.minio: minio.Minio | None = None  # s3: the server, started with the snapshot parts
        self.cluster: LocalCluster | None = None
        self.node: KubeletNode | None = None
        self.ports = {"agent": _free_port(), "operator": _free_port()}

    # -- parts ----------------------------------------------------------------------------------------
    @property
    def agent_log(self) -> Path:
        return self.root / "cluster" / "logs" / f"{AGENT}.log"

    def agent_log_text(self) -> str:
        """The agent's log: its process's file, or (installed) its pod's."""
        if self.installed:
            return installed.agent_log(self)
        return self.agent_log.read_text(errors="replace") if self.agent_log.exists() else ""

    def operator_log_text(self) -> str:
        if self.installed:
            return installed.operator_log(self)
        return self.operator_log.read_text(errors="replace") if self.operator_log.exists() else ""

    @property
    def operator_log(self) -> Path:
        return self.root / "cluster" / "logs" / "operator.log"

    @property
    def agent_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['agent']}/metrics"

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def _operator(self, cluster: LocalCluster) -> Component:
        storage: dict[str, Any] = {"type": "pvc", "accessMode": self.storage_mode}
        if self.storage_mode == "s3":
            storage = {"type": "s3", "s3": {"bucket": S3_BUCKET, "prefix": S3_PREFIX}}
        elif self.storage_mode == "podMount":
            storage["pvc"] = {"pvcName": PVC_NAME, "basePath": POD_BASE_PATH, "create": False}
        checkpoint: dict[str, Any] = {"enabled": True, "storage": storage}
        if self.staging_max_nodes is not None:
            checkpoint["staging"] = {"maxNodes": self.staging_max_nodes}
        config = self.root / "operator.yaml"
        config.write_text(yaml.safe_dump({"checkpoint": checkpoint}))
        port = self.ports["operator"]
        return Component(
            "operator",
            lambda: self._python("-m", "dynamo_snapshot.controllers", f"--kubeconfig={cluster.kubeconfig}",
                                 f"--config={config}", f"--namespace={self.namespace}", "--metrics-bind-address=0",
                                 f"--health-probe-bind-address=127.0.0.1:{port}", "--workers=2"),
            lambda: f"http://127.0.0.1:{port}/readyz",
        )

    def _agent(self, cluster: LocalCluster, node: KubeletNode) -> Component:
        config = self.root / "agent.yaml"
        keys = self.root / "agent-keys"  # the checkpoint keys, readable by the agent only (the chart's Secret)
        if not keys.is_dir():
            from dynamo_snapshot.agent.artifact import authn

            authn.create_key(keys, "k1")
        settings: dict[str, Any] = {"criu": self.criu_config, "keys": {"directory": str(keys)},
                                    "restore": {"privateDir": str(self.root / "agent-private")}}
        mode, base = self.storage_mode, str(self.checkpoints) if self.storage_mode == "agentMount" else POD_BASE_PATH
        if self.minio is not None:
            settings["storage"] = self.minio.agent_storage(S3_BUCKET, S3_PREFIX, self.root / "s3-credentials")
            mode, base = "agentMount", str(self.objects)
        if self.node_cache_gib:
            settings["cache"] = {"dir": str(self.node_cache), "budgetGiB": self.node_cache_gib}
        config.write_text(yaml.safe_dump(settings))
        kubeconfig = cluster.kubeconfig_for(f"system:serviceaccount:{self.namespace}:{AGENT}")
        port = self.ports["agent"]
        return Component(
            AGENT,
            lambda: self._python(
                "-m", "dynamo_snapshot.agent.service.main", f"--node-name={node.name}", f"--namespace={self.namespace}",
                "--namespace-restricted", "--runtime-type=containerd", f"--runtime-socket={node.cri_socket}",
                f"--storage-access-mode={mode}", f"--storage-base-path={base}", "--host-proc=/proc",
                f"--config={config}", f"--metrics-bind-address=127.0.0.1:{port}", f"--kubeconfig={kubeconfig}"),
            lambda: f"http://127.0.0.1:{port}/readyz",
        )

    def _namespace_objects(self) -> list[dict[str, Any]]:
        ns = self.namespace
        objects: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT, "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": AGENT, "namespace": ns},
             "rules": AGENT_RULES + (CACHE_RULES if self.node_cache_gib else [])},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": AGENT, "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT},
             "subjects": [{"kind": "ServiceAccount", "name": AGENT, "namespace": ns}]},
        ]
        labels = {"app.kubernetes.io/component": "snapshot-agent", "app.kubernetes.io/name": AGENT}
        if self.storage_mode == "agentMount":
            objects.append({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": AGENT, "namespace": ns, "labels": labels,
                             "annotations": {"dynamo-snapshot.dev/stand-in": "the agent runs as a local process"}},
                "spec": {
                    "selector": {"matchLabels": {"app.kubernetes.io/name": AGENT}},
                    "template": {"metadata": {"labels": labels}, "spec": {
                        "nodeSelector": {"dynamo-snapshot.dev/agent-runs-as-a-local-process": "true"},
                        "containers": [{"name": "agent", "image": "localhost/dynamo-snapshot/agent:local",
                                        "volumeMounts": [{"name": "checkpoints", "mountPath": POD_BASE_PATH}]}],
                        "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": PVC_NAME}}],
                    }},
                },
            })
        elif self.storage_mode == "podMount":
            volume = f"{ns}-{PVC_NAME}"
            objects += [
                {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
                 "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"],
                          "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                          "hostPath": {"path": str(self.checkpoints), "type": "Directory"},
                          "claimRef": {"namespace": ns, "name": PVC_NAME}}},
                {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": PVC_NAME, "namespace": ns},
                 "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                          "resources": {"requests": {"storage": "10Gi"}}}},
            ]
        return objects

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> SnapshotStack:
        try:
            self.start_control_plane()
            self.start_node()
            self.start_snapshot()
        except BaseException:
            self.stop()
            raise
        return self

    def start_control_plane(self) -> LocalCluster:
        self.cluster = LocalCluster(self.root / "cluster").start()
        install_crds(self.cluster.kubectl, CRD_DIR)
        return self.cluster

    def start_node(self) -> KubeletNode:
        assert self.cluster is not None
        archives = images.build(self.root / "images", self.extra_image_files)
        if self.installed:
            archives += installed.archives(self.root / "images")
        self.node = KubeletNode(self.cluster, route_api_server=self.installed,
                                gpu_plugin=self.gpu_plugin).start(archives)
        for archive in archives:
            archive.unlink()
        return self.node

    def start_snapshot(self) -> None:
        """The namespace with the agent's RBAC (and storage), the operator and the agent."""
        assert self.cluster is not None and self.node is not None
        if self.installed:
            installed.install(self)
            return
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(self._namespace_objects()))
        if self.storage_mode == "s3":
            self.minio = minio.Minio(self.root / "minio")
            self.minio.start().create_bucket(S3_BUCKET)
        if self.storage_mode == "podMount":
            # A pod of an unbound claim is unschedulable and waits for the scheduler's requeue: bound first.
            self.cluster.kubectl("wait", "-n", self.namespace, f"pvc/{PVC_NAME}",
                                 "--for=jsonpath={.status.phase}=Bound", "--timeout=120s")
        self.cluster.add_component(self._operator(self.cluster))
        self.cluster.add_component(self._agent(self.cluster, self.node))
        self.cluster.start_component("operator")
        self.cluster.start_component(AGENT)

    def restart_agent(self, *, kill: bool = False) -> None:
        assert self.cluster is not None
        if self.installed:
            installed.restart_agent(self)
            return
        self.cluster.restart_component(AGENT, kill=kill)

    def stop(self) -> None:
        if self.cluster is not None:
            for name in (AGENT, "operator"):
                with contextlib.suppress(KeyError):
                    self.cluster.stop_component(name, timeout=120)  # the agent may be finishing a checkpoint
        if self.node is not None:
            self.node.stop()
        if self.minio is not None:
            self.minio.stop()
        if self.cluster is not None:
            self.cluster.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[SnapshotStack]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- looking at it --------------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        assert self.cluster is not None
        result = subprocess.run([str(self.cluster.bin / "kubectl"), f"--kubeconfig={self.cluster.kubeconfig}", *args],
                                input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(obj))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", kind, name, "-n", self.namespace, "-o", "json"))

    def list(self, kind: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", self.namespace, "-o", "json"]
        return json.loads(self.kubectl(*args, *(["-l", selector] if selector else [])))["items"]

    def watch(self, resource: Resource, condition: Callable[[list[dict[str, Any]]], Any], what: str, *,
              name: str | None = None, label_selector: str | None = None, timeout: float = 300) -> Any:
        """Watch objects of the namespace (one by ``name``, or by ``label_selector``) until ``condition``
        of them is truthy; returns that value."""
        assert self.cluster is not None
        kubeconfig = self.cluster.kubeconfig
        found: list[Any] = []

        async def wait() -> None:
            async with Client.from_config(str(kubeconfig)) as client:
                informer = Informer(client, resource, namespace=self.namespace, label_selector=label_selector,
                                    field_selector=f"metadata.name={name}" if name else None)

                def met() -> bool:
                    found[:] = [condition(informer.store.list())]
                    return bool(found[0])

                # the deadline outside the task group: it ends as one TimeoutError, not a group holding one
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as tg:
                        await tg.start(informer.run)
                        await informer.wait_until(met)
                        tg.cancel_scope.cancel()

        try:
            anyio.run(wait)
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.explain()}") from None
        return found[0]

    def explain(self, lines: int = 15) -> str:
        """What a timed-out wait needs to be explained, bounded (CI shows the first failure in full): each
        pod of the namespace with its phase, conditions and container states, and the last lines of the
        agent's and the operator's logs."""
        parts = [*(self.cluster.exited() if self.cluster is not None else []), "--- nodes ---"]
        try:
            for node in json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]:
                # Ready that is not True, or a pressure condition that is: why nothing gets scheduled or run
                odd = [f"{c.get('type')}={c.get('status')} {c.get('reason') or ''} {c.get('message') or ''}".strip()
                       for c in (node.get("status") or {}).get("conditions") or []
                       if (c.get("type") == "Ready") != (c.get("status") == "True")]
                taints = [f"{t.get('key')}:{t.get('effect')}" for t in (node.get("spec") or {}).get("taints") or []]
                parts.append(f"{node['metadata']['name']} {'; '.join(odd) or 'Ready'} taints={taints}"[:600])
        except (ClusterError, subprocess.SubprocessError, ValueError, KeyError) as err:
            parts.append(f"(no node list: {err})")
        parts.append("--- pods ---")
        try:
            for pod in self.list("pods"):
                status = pod.get("status") or {}
                false = [f"{c.get('type')}: {c.get('reason') or ''} {c.get('message') or ''}".strip()
                         for c in status.get("conditions") or [] if c.get("status") != "True"]
                states = [f"{c.get('name')}={next(iter(c.get('state') or {}), '?')}"
                          f"(restarts {c.get('restartCount', 0)})" for c in status.get("containerStatuses") or []]
                parts.append(f"{pod['metadata']['name']} {status.get('phase')} {' '.join(states)} "
                             f"{'; '.join(false)}"[:400])
        except (ClusterError, subprocess.SubprocessError, ValueError) as err:
            parts.append(f"(no pod list: {err})")
        for what, read in (("agent", self.agent_log_text), ("operator", self.operator_log_text)):
            try:
                text = read()
            except (ClusterError, subprocess.SubprocessError, OSError) as err:
                text = f"(no log: {err})"
            parts.append(f"--- last lines of the {what}'s log ---")
            parts.extend(line[:400] for line in text.splitlines()[-lines:])
        return "\n".join(parts)

    def wait_object(self, resource: Resource, name: str, condition: Callable[[dict[str, Any]], Any], what: str,
                    timeout: float = 300) -> dict[str, Any]:
        """Watch one object until ``condition(obj)`` holds; returns the object."""
        def check(objects: list[dict[str, Any]]) -> dict[str, Any] | None:
            return objects[0] if objects and condition(objects[0]) else None

        return self.watch(resource, check, what, name=name, timeout=timeout)

    def logs(self, pod: str, container: str = "main") -> str:
        return self.kubectl("logs", pod, "-n", self.namespace, "-c", container, check=False)

    def worker_events(self, pod: str) -> list[dict[str, Any]]:
        """The counter worker's JSON lines from a pod's log."""
        return [json.loads(line) for line in self.logs(pod).splitlines() if line.startswith("{")]

    def agent_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The agent's log records (JSON lines), optionally only those of one event."""
        found = []
        for line in self.agent_log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if event is None or record.get("event") == event:
                    found.append(record)
        return found

    def wait_until(self, check: Any, what: str, timeout: float = 180) -> Any:
        """For what has no watch (a line in a container log): poll the cheap read."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)


def missing() -> str | None:
    """Why this machine cannot run the stack, in one line (None when it can)."""
    from dynamo_snapshot.agent.container import criu
    from dynamo_snapshot.devcluster import binaries, node

    try:
        binaries.require((*binaries.REQUIRED, "kubelet"))
    except binaries.MissingBinaries as err:
        return str(err)
    if reason := node.missing():
        return reason
    try:
        criu.CriuBundle.locate()
    except FileNotFoundError:
        return "CRIU is not built (run hack/ci/containers.sh)"
    if reason := images.base_layer_missing():
        return reason
    if not os.path.exists("/proc/sys/kernel/ns_last_pid"):
        return "the kernel lacks CONFIG_CHECKPOINT_RESTORE"
    return None
