"""Test doubles for the parts of a cluster that are not running: the operator runs as a real process, the
test plays the kubelet (pod status) and the snapshot agent (Job annotation and Lease)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dynamo_snapshot.api import DynamoCheckpoint, convert

REPO = Path(__file__).resolve().parents[2]
OPERATOR = [sys.executable, "-m", "dynamo_snapshot.controllers"]


class OperatorProcess:
    """`dynamo-snapshot operator` watching one namespace, as a child process."""

    def __init__(self, kubeconfig: Path, namespace: str, workdir: Path, config: dict[str, Any]):
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.config_path = workdir / "operator-config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "operator.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*OPERATOR, f"--kubeconfig={self.kubeconfig}", f"--config={self.config_path}",
             f"--namespace={self.namespace}", "--metrics-bind-address=0", "--health-probe-bind-address=0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "DYN_SNAPSHOT_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a node dies under the operator."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def enabled_config(**storage: Any) -> dict[str, Any]:
    return {"checkpoint": {"enabled": True, "storage": storage or {}}}


def checkpoint_manifest(name: str, *, model: str = "meta-llama/Llama-2-7b-hf", target: str = "main",
                        containers: list[dict[str, Any]] | None = None, **job: Any) -> dict[str, Any]:
    containers = containers or [{"name": "main", "image": "placeholder:1",
                                 "livenessProbe": {"exec": {"command": ["true"]}}}]
    return {
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoCheckpoint",
        "metadata": {"name": name},
        "spec": {
            "identity": {"model": model, "backendFramework": "vllm"},
            "job": {"targetContainerName": target, "podTemplateSpec": {"spec": {"containers": containers}}, **job},
        },
    }


def agent_daemonset(name: str = "snapshot-agent", *, pvc: str | None = "snapshot-pvc",
                    base_path: str = "/checkpoints") -> dict[str, Any]:
    volumes = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": pvc}}] if pvc else []
    mounts = [{"name": "checkpoints", "mountPath": base_path}] if pvc else []
    labels = {"app.kubernetes.io/component": "snapshot-agent", "app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "agent", "image": "snapshot-agent:1",
                                                  "volumeMounts": mounts}], "volumes": volumes}},
        },
    }


def eventually(check, *, timeout: float = 30, what: str = "condition") -> None:
    """For what kubectl cannot wait on (a value leaving a list, a count): poll the cheap read."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.3)


def now_rfc3339(offset: float = 0.0) -> str:
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Cluster:
    """kubectl verbs for one namespace, plus the kubelet's and the agent's parts."""

    def __init__(self, kubectl, namespace: str):
        self.kubectl = kubectl
        self.namespace = namespace

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(obj))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", kind, name, "-n", self.namespace, "-o", "json"))

    def get_if_exists(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it is not there (no race between an existence check and a read)."""
        out = self.kubectl("get", kind, name, "-n", self.namespace, "--ignore-not-found", "-o", "json")
        return json.loads(out) if out.strip() else None

    def exists(self, kind: str, name: str) -> bool:
        out = self.kubectl.run("get", kind, name, "-n", self.namespace, "--ignore-not-found", "-o", "name",
                               check=False).stdout
        return bool(out.strip())

    def list(self, kind: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", self.namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args))["items"]

    def wait(self, kind: str, name: str, jsonpath: str, value: str, timeout: int = 60) -> None:
        """Wait (a watch, in kubectl) until the object exists and `jsonpath` of it equals `value`."""
        self.kubectl("wait", f"{kind}/{name}", "-n", self.namespace, "--for=create", f"--timeout={timeout}s")
        self.kubectl("wait", f"{kind}/{name}", "-n", self.namespace, f"--for=jsonpath={jsonpath}={value}",
                     f"--timeout={timeout}s")

    def wait_phase(self, name: str, phase: str, timeout: int = 60) -> dict[str, Any]:
        self.wait("dynamocheckpoint", name, "{.status.phase}", phase, timeout)
        return self.get("dynamocheckpoint", name)

    def wait_created(self, kind: str, name: str, timeout: int = 60) -> dict[str, Any]:
        self.kubectl("wait", f"{kind}/{name}", "-n", self.namespace, "--for=create", f"--timeout={timeout}s")
        return self.get(kind, name)

    def events(self, name: str) -> list[dict[str, Any]]:
        items = json.loads(self.kubectl("get", "events.events.k8s.io", "-n", self.namespace, "-o", "json"))["items"]
        return [e for e in items if e.get("regarding", {}).get("name") == name]

    def wait_event(self, name: str, reason: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:  # events have no "wait for": poll the few there are
            found = [e for e in self.events(name) if e.get("reason") == reason]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {reason} event for {name}: {[e.get('reason') for e in self.events(name)]}")
            time.sleep(0.5)

    # -- the kubelet's part -------------------------------------------------------------------------------
    def job_pod(self, job: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:  # the Job controller creates it; kubectl cannot wait for "some pod with this label"
            pods = self.list("pods", f"batch.kubernetes.io/job-name={job}")
            if pods:
                return pods[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"the Job controller created no pod for {job}")
            time.sleep(0.3)

    def finish_pod(self, pod: str, *, exit_code: int = 0, reason: str = "Completed", container: str = "main"):
        phase = "Succeeded" if exit_code == 0 else "Failed"
        status = {"phase": phase, "containerStatuses": [{
            "name": container, "image": "placeholder:1", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}]}
        self.kubectl("patch", "pod", pod, "-n", self.namespace, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": status}))

    def run_job_to(self, job: str, *, exit_code: int = 0, reason: str = "Completed") -> None:
        pod = self.job_pod(job)
        self.finish_pod(pod["metadata"]["name"], exit_code=exit_code, reason=reason)
        condition = "Complete" if exit_code == 0 else "Failed"
        self.kubectl("wait", f"job/{job}", "-n", self.namespace, f"--for=condition={condition}", "--timeout=60s")

    def make_ready(self, pod: str, container: str = "main") -> None:
        """The kubelet started the pod and its probes pass."""
        status = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True",
                                                      "lastTransitionTime": now_rfc3339(-5)}],
                  "containerStatuses": [{"name": container, "image": "placeholder:1", "imageID": "", "ready": True,
                                         "started": True, "restartCount": 0,
                                         "state": {"running": {"startedAt": now_rfc3339(-5)}}}]}
        self.kubectl("patch", "pod", pod, "-n", self.namespace, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": status}))

    def pods_of(self, selector: str) -> list[dict[str, Any]]:
        return [p for p in self.list("pods", selector) if not p["metadata"].get("deletionTimestamp")]

    def wait_pods(self, selector: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        eventually(lambda: len(self.pods_of(selector)) == count, timeout=timeout,
                   what=f"{count} pods with {selector}")
        return self.pods_of(selector)

    # -- the agent's part ---------------------------------------------------------------------------------
    def agent_verdict(self, job: str, verdict: str) -> None:
        self.kubectl("annotate", "job", job, "-n", self.namespace, "--overwrite",
                     f"nvidia.com/snapshot-checkpoint-status={verdict}")

    def agent_lease(self, job: str, checkpoint_id: str, *, duration: int = 15, renewed_ago: float = 0.0) -> None:
        self.apply({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": job, "labels": {"nvidia.com/snapshot-checkpoint-id": checkpoint_id}},
            "spec": {"holderIdentity": "snapshot-agent-node-1", "leaseDurationSeconds": duration,
                     "renewTime": now_rfc3339(-renewed_ago), "acquireTime": now_rfc3339(-renewed_ago)},
        })


def decoded_checkpoint(**meta: Any) -> DynamoCheckpoint:
    """A DynamoCheckpoint struct with a main container (probes set) and a sidecar."""
    return convert({
        "metadata": {"name": "c", "namespace": "ns", "uid": "u-1", **meta},
        "spec": {"identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
                 "job": {"podTemplateSpec": {"spec": {"containers": [
                     {"name": "main", "image": "placeholder", "livenessProbe": {"exec": {"command": ["x"]}},
                      "startupProbe": {"exec": {"command": ["y"]}}, "readinessProbe": {"httpGet": {"port": 80}}},
                     {"name": "sidecar", "image": "s"}]}}}},
    }, DynamoCheckpoint)
