"""The checkpoint/restore flow on a ``SnapshotStack``, step by step, with what each step took: shared by
the demo (which prints it), the end-to-end tests (which check it) and bench/e2e.py (which repeats it).

Times are wall-clock seconds on this machine; the counter worker stamps its own events with
``time.time()``, the agent its log records, so they compare directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster.images import PLACEHOLDER_IMAGE
from dynamo_snapshot.devcluster.stack import SnapshotStack
from dynamo_snapshot.kube import DYNAMO_CHECKPOINTS, DYNAMO_GRAPH_DEPLOYMENTS, PODS

WORKER = "worker"
SOURCE_LABEL = f"{names.LABEL_IS_CHECKPOINT_SOURCE}=true"


def worker_container(heap_mib: int, **env: str) -> dict[str, Any]:
    values = {"COUNTER_HEAP_MB": str(heap_mib), "COUNTER_REPORT_EVERY": "50", **env}
    return {"name": "main", "image": PLACEHOLDER_IMAGE, "imagePullPolicy": "IfNotPresent",
            "env": [{"name": k, "value": v} for k, v in values.items()]}


def checkpoint_manifest(name: str, *, heap_mib: int = 64, model: str = "demo/counter",
                        container: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION, "kind": names.CHECKPOINT_KIND, "metadata": {"name": name},
        "spec": {
            "identity": {"model": model, "backendFramework": "vllm"},
            "job": {"activeDeadlineSeconds": 600, "sharedMemory": "64Mi",
                    "podTemplateSpec": {"spec": {"containers": [container or worker_container(heap_mib)]}}},
        },
    }


def dgd_manifest(name: str, *, replicas: int, policy: str = "Immediate", heap_mib: int = 64,
                 checkpoint_ref: str | None = None) -> dict[str, Any]:
    main = worker_container(heap_mib)
    main.pop("name")
    checkpoint: dict[str, Any] = {"enabled": True}
    if checkpoint_ref:
        checkpoint["checkpointRef"] = checkpoint_ref
    else:
        checkpoint.update({"mode": "Auto", "startupPolicy": policy})
    return {
        "apiVersion": names.API_VERSION, "kind": names.DGD_KIND, "metadata": {"name": name},
        "spec": {"backendFramework": "vllm", "services": {WORKER: {
            "componentType": "worker", "replicas": replicas, "extraPodSpec": {"mainContainer": main},
            "checkpoint": checkpoint}}},
    }


def dgd_manifest_v1beta1(name: str, *, replicas: int, policy: str = "Immediate", heap_mib: int = 64) -> dict[str, Any]:
    """`dgd_manifest`'s automatic-checkpoint graph in upstream's v1beta1 shape (a components list, the
    worker's container `main` in `podTemplate`, `experimental.checkpoint` present: enabled)."""
    return {
        "apiVersion": f"{names.GROUP}/{names.DGD_VERSION_V1BETA1}", "kind": names.DGD_KIND, "metadata": {"name": name},
        "spec": {"backendFramework": "vllm", "components": [{
            "name": WORKER, "type": "worker", "replicas": replicas,
            "podTemplate": {"spec": {"containers": [worker_container(heap_mib)]}},
            "experimental": {"checkpoint": {"mode": "Auto", "startupPolicy": policy}}}]},
    }


def _log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


@dataclass
class CheckpointRun:
    name: str
    checkpoint_id: str
    job: str
    source_pod: str
    instance: str  # the checkpointed worker's instance
    seconds: float  # apply -> Ready
    ready_to_criu: float  # the worker wrote ready-for-snapshot -> CRIU started (kubelet probe included)
    agent_overhead: float  # the agent saw the pod Ready -> CRIU started
    agent_total: float  # lease taken -> verdict written and workload told
    stages: dict[str, float] = field(default_factory=dict)
    artifact_bytes: int = 0


@dataclass
class RestoredPod:
    name: str
    container_id: str
    instance: str
    count_at_restore: int
    heap_ok: bool
    hostname: str
    seconds: float  # from the action that created the pod to the worker running again
    agent_total: float
    stages: dict[str, float] = field(default_factory=dict)


class CheckpointFailed(RuntimeError):
    pass


class Flow:
    def __init__(self, stack: SnapshotStack):
        self.stack = stack

    # -- checkpoints ---------------------------------------------------------------------------------------
    def create_checkpoint(self, manifest: dict[str, Any], timeout: int = 300) -> CheckpointRun:
        started = time.time()
        self.stack.apply(manifest)
        return self.wait_checkpoint(manifest["metadata"]["name"], started, timeout)

    def wait_verdict(self, name: str, timeout: float = 300) -> dict[str, Any]:
        """Watch a DynamoCheckpoint until it is Ready or Failed; returns it."""
        return self.stack.wait_object(
            DYNAMO_CHECKPOINTS, name, lambda c: (c.get("status") or {}).get("phase") in ("Ready", "Failed"),
            f"DynamoCheckpoint {name} to become Ready or Failed", timeout)

    def wait_checkpoint(self, name: str, started: float, timeout: float = 300) -> CheckpointRun:
        ckpt = self.wait_verdict(name, timeout)
        seconds = time.time() - started
        if ckpt["status"]["phase"] != "Ready":
            raise CheckpointFailed(f"DynamoCheckpoint {name} failed: {ckpt['status'].get('message')}")
        checkpoint_id, job = ckpt["status"]["checkpointID"], ckpt["status"]["jobName"]
        completed = next(r for r in self.stack.agent_events("checkpoint completed") if r.get("job") == job)
        dump_started = next(r for r in self.stack.agent_events("checkpoint dump started") if r.get("job") == job)
        events = self.stack.worker_events(completed["name"])
        ready = next(e for e in events if e["event"] == "ready-for-snapshot")
        size = int(completed.get("image_bytes") or 0)  # what the manifest lists
        return CheckpointRun(
            name=name, checkpoint_id=checkpoint_id, job=job, source_pod=completed["name"], instance=ready["instance"],
            seconds=seconds, ready_to_criu=_log_time(dump_started) - ready["time"],
            agent_overhead=dump_started["seconds_since_ready"], agent_total=completed["total_seconds"],
            stages=completed["seconds"], artifact_bytes=size)

    # -- restores ------------------------------------------------------------------------------------------
    def restore_records(self) -> dict[str, dict[str, Any]]:
        return {r["container_id"]: r for r in self.stack.agent_events("restore completed")}

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return [p for p in self.stack.list("pods", selector) if not p["metadata"].get("deletionTimestamp")]

    @staticmethod
    def restored(pod: dict[str, Any]) -> bool:
        annotations = pod["metadata"].get("annotations") or {}
        return annotations.get(names.restore_status_annotation("main")) == names.STATUS_COMPLETED

    def wait_pods(self, selector: str, condition: Any, count: int, what: str, timeout: float = 300
                  ) -> list[dict[str, Any]]:
        """Watch the pods of ``selector`` until ``count`` of them (not being deleted) meet ``condition``."""
        def enough(pods: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            meeting = [p for p in pods if not p["metadata"].get("deletionTimestamp") and condition(p)]
            return meeting if len(meeting) >= count else None

        return self.stack.watch(PODS, enough, what, label_selector=selector, timeout=timeout)

    def wait_restored(self, selector: str, count: int, started: float, timeout: float = 300) -> list[RestoredPod]:
        """Wait until ``count`` pods matching ``selector`` are restored and their workers report it."""
        pods = self.wait_pods(selector, self.restored, count, f"{count} restored pods with {selector}", timeout)

        def reported() -> bool:  # the worker prints it within a tick of restore-complete; logs have no watch
            return all(any(e["event"] == "restored" for e in self.stack.worker_events(p["metadata"]["name"]))
                       for p in pods)

        self.stack.wait_until(reported, "the restored workers to report", 30)
        records = self.restore_records()
        found = []
        for pod in pods:
            name = pod["metadata"]["name"]
            container_id = (pod["metadata"]["annotations"] or {})[names.restore_container_id_annotation("main")]
            restored = next(e for e in self.stack.worker_events(name) if e["event"] == "restored")
            record = records.get(container_id, {})
            found.append(RestoredPod(
                name=name, container_id=container_id, instance=restored["instance"],
                count_at_restore=restored["count"], heap_ok=restored["heap_ok"], hostname=restored["hostname"],
                seconds=restored["time"] - started, agent_total=record.get("total_seconds", 0.0),
                stages=record.get("seconds", {})))
        return sorted(found, key=lambda p: p.name)

    def scale(self, dgd: str, replicas: int) -> float:
        """Scale the DGD's worker; returns when it was asked."""
        started = time.time()
        self.stack.kubectl("patch", names.DGD_KUBECTL_V1ALPHA1, dgd, "-n", self.stack.namespace, "--type=merge",
                           "-p", f'{{"spec":{{"services":{{"{WORKER}":{{"replicas":{replicas}}}}}}}}}')
        return started

    def auto_checkpoint_name(self, dgd: str) -> str:
        obj = self.stack.wait_object(
            DYNAMO_GRAPH_DEPLOYMENTS, dgd, lambda d: ((d.get("status") or {}).get("checkpoints") or {}).get(WORKER),
            f"DGD {dgd} to name its automatic checkpoint")
        return obj["status"]["checkpoints"][WORKER]["checkpointName"]


def component_selector(dgd: str) -> str:
    return f"{names.LABEL_DGD_NAME}={dgd},{names.LABEL_COMPONENT}={WORKER}"
