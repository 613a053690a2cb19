"""The GPU worker on a real kubelet: the local stack (control plane, kubelet on containerd, the GPU device
plugin, operator, agent) on this GPU machine, the stand-in worker (worker.py) in the placeholder image asking
for ``nvidia.com/gpu: 1``, checkpointed by the agent through a DynamoCheckpoint and restored by a DGD with
``startupPolicy: WaitForCheckpoint``. Run by node-e2e.sh; every step's time and verdict go to results.json.

Stages, in order (each recorded; the first failure ends the run with its error):
    stack      SnapshotStack up with the GPU plugin; the worker files in the placeholder image
    cold       a plain pod of the worker: apply -> serving (its TCP server answers ``state``)
    checkpoint a DynamoCheckpoint of the same container: apply -> Ready (agent stage times from its log)
    restore    a DGD (WaitForCheckpoint, checkpointRef): apply -> restored pod serving; its ``state``
               equals the cold worker's (weight checksum, compiled outputs, captured graph), over a new
               TCP connection
    scale      the DGD scaled to 2: a second restored pod serves while the cold pod keeps serving
    mismatch   the node's driver release made to differ (a bind mount over /proc/driver/nvidia/version), the
               DGD scaled to 3: the agent refuses the restore, the reason lands in the pod's annotation and
               the DGD's status; the mount is taken off again

One GPU holds them all: the device plugin offers it as four ``nvidia.com/gpu`` (``--replicas 4``, NVIDIA's
time-slicing), so the cold pod, the checkpoint's source pod and the restored pods share it.

The one test shortcut: PyTorch and its Python come from the machine (hostPath mounts of /opt/torch and of
the host's /usr subtrees over the image's), not from the image; snapshot-init and dynamo_snapshot.workload
are the image's (/usr/local, /opt/dynamo-snapshot stay the image's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dynamo_snapshot.agent.cuda import devices as cuda_devices  # noqa: E402
from dynamo_snapshot.api import names  # noqa: E402
from dynamo_snapshot.devcluster.images import PLACEHOLDER_IMAGE  # noqa: E402
from dynamo_snapshot.devcluster.stack import SnapshotStack  # noqa: E402
from dynamo_snapshot.kube import DYNAMO_CHECKPOINTS, DYNAMO_GRAPH_DEPLOYMENTS  # noqa: E402

PORT = 7000
# Host trees mounted over the image's: the host's Python (3.12) and what torch.compile needs (a C compiler,
# headers). /usr/local (snapshot-init) and /opt/dynamo-snapshot stay the image's.
HOST_TREES = ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/include", "/usr/share")


def container(weights: Path, batch_sizes: str, torch_root: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    trees = [t for t in HOST_TREES if Path(t).is_dir()] + [torch_root, str(weights.parent)]
    volumes = [{"name": f"host{i}", "hostPath": {"path": t, "type": "Directory"}} for i, t in enumerate(trees)]
    mounts = [{"name": f"host{i}", "mountPath": t, "readOnly": True} for i, t in enumerate(trees)]
    main = {
        "name": "main", "image": PLACEHOLDER_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": [names.SNAPSHOT_INIT_PATH, "--", f"{torch_root}/.venv/bin/python3", "/opt/workloads/worker.py",
                    "--weights", str(weights), "--port", str(PORT), "--host", "0.0.0.0",
                    "--batch-sizes", batch_sizes, "--mark-ready"],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "PYTHONPATH", "value": "/opt/dynamo-snapshot"}],
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
        "volumeMounts": mounts,
    }
    return main, volumes


def ask(ip: str, cmd: str, timeout: float = 60) -> dict[str, Any]:
    with socket.create_connection((ip, PORT), timeout=timeout) as conn:
        conn.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def wait_serving(stack: SnapshotStack, selector: str, timeout: float, count: int = 1,
                 ) -> list[tuple[str, dict[str, Any]]]:
    """``count`` pods of ``selector`` whose workers answer ``state`` (the TCP server is the readiness)."""
    def serving() -> list[tuple[str, dict[str, Any]]] | None:
        found = []
        for pod in stack.list("pods", selector):
            ip = pod.get("status", {}).get("podIP")
            if not ip or pod.get("status", {}).get("phase") != "Running":
                continue
            try:
                found.append((pod["metadata"]["name"], ask(ip, "state", timeout=5)))
            except (OSError, ValueError):
                continue
        return found if len(found) >= count else None

    return stack.wait_until(serving, f"{count} serving worker(s) ({selector})", timeout=timeout)


def refused_restore(stack: SnapshotStack, selector: str) -> dict[str, Any] | None:
    """A pod of ``selector`` whose restore the agent failed: its name and the agent's message."""
    for pod in stack.list("pods", selector):
        annotations = pod["metadata"].get("annotations") or {}
        if annotations.get(names.restore_status_annotation("main")) == names.STATUS_FAILED:
            return {"pod": pod["metadata"]["name"],
                    "message": annotations.get(names.restore_message_annotation("main"))}
    return None


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("weights", "outputs", "graph"))


def ask_pod(stack: SnapshotStack, pod: str) -> dict[str, Any]:
    return ask(stack.get("pod", pod)["status"]["podIP"], "state")


def refuse_on_other_driver(stack: SnapshotStack, selector: str, timeout: float) -> dict[str, Any]:
    """Scale to 3 while the node reports another driver release: the restore must be refused by name."""
    version = Path("/proc/driver/nvidia/version")
    real = version.read_text()
    fake = Path("/run/dynamo-snapshot-fake-driver-version")
    release = cuda_devices.driver_version()
    if release is None:
        raise RuntimeError(f"no driver release in {version}")
    major, _, rest = release.partition(".")
    fake.write_text(real.replace(release, f"{int(major) + 1}.{rest}", 1))
    subprocess.run(["mount", "--bind", str(fake), str(version)], check=True)
    try:
        scale(stack, "gpu", 3)
        refused = stack.wait_until(lambda: refused_restore(stack, selector), "a refused restore", timeout=timeout)
    finally:
        subprocess.run(["umount", str(version)], check=False)
    dgd = stack.get("dgd", "gpu")
    refused["dgd_status"] = dgd.get("status")
    refused["names_driver"] = "driver" in (refused.get("message") or "")
    return refused


class Run:
    def __init__(self, out: Path):
        self.out = out
        self.results: dict[str, Any] = {"steps": {}}

    def step(self, name: str, fn, *args: Any) -> Any:
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            value = fn(*args)
        except BaseException as err:
            self.results["steps"][name] = {"ok": False, "s": round(time.time() - t0, 2),
                                           "error": f"{type(err).__name__}: {err}"[:4000]}
            self.save()
            traceback.print_exc()
            raise
        self.results["steps"][name] = {"ok": True, "s": round(time.time() - t0, 2)}
        print(f"   {name}: {time.time() - t0:.1f} s", flush=True)
        self.save()
        return value

    def save(self) -> None:
        (self.out / "node-e2e.json").write_text(json.dumps(self.results, indent=2, default=str))


REF_SELECTOR = f"{names.LABEL_DGD_NAME}=gpu,!{names.LABEL_IS_CHECKPOINT_SOURCE}"  # the referencing DGD's pods


def drop_caches() -> None:
    """The page cache emptied, so a restore reads its image from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dgd_manifest(name: str, main_dgd: dict[str, Any], volumes: list[dict[str, Any]],
                 checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": names.API_VERSION, "kind": names.DGD_KIND, "metadata": {"name": name},
            "spec": {"backendFramework": "vllm", "services": {"worker": {
                "componentType": "worker", "replicas": 1,
                "extraPodSpec": {"mainContainer": main_dgd, "volumes": volumes}, "checkpoint": checkpoint}}}}


def scale(stack: SnapshotStack, dgd: str, replicas: int) -> float:
    started = time.time()
    stack.kubectl("patch", names.DGD_KUBECTL_V1ALPHA1, dgd, "-n", stack.namespace, "--type=merge",
                  "-p", json.dumps({"spec": {"services": {"worker": {"replicas": replicas}}}}))
    return started


def checkpoint_and_restore(run: Run, stack: SnapshotStack, main_container: dict[str, Any], main_dgd: dict[str, Any],
                           volumes: list[dict[str, Any]], cold_state: dict[str, Any], args: argparse.Namespace) -> bool:
    """A DynamoCheckpoint of the worker, then a DGD referencing it: restored from disk, scaled from memory."""
    ckpt = {"apiVersion": names.API_VERSION, "kind": names.CHECKPOINT_KIND, "metadata": {"name": "gpu-worker"},
            "spec": {"identity": {"model": "bench/gpu-stand-in", "backendFramework": "vllm"},
                     "job": {"activeDeadlineSeconds": 900, "sharedMemory": "1Gi", "podTemplateSpec": {
                         "spec": {"containers": [main_container], "volumes": volumes}}}}}
    t0 = time.time()
    stack.apply(ckpt)
    done = run.step("checkpoint", stack.wait_object, DYNAMO_CHECKPOINTS, "gpu-worker",
                    lambda c: c.get("status", {}).get("phase") in ("Ready", "Failed"), "a checkpoint verdict",
                    args.timeout)
    run.results["checkpoint_apply_to_ready_s"] = round(time.time() - t0, 2)
    run.results["checkpoint_status"] = done.get("status")
    if done["status"]["phase"] != "Ready":
        raise RuntimeError(f"checkpoint failed: {done.get('status')}")
    drop_caches()  # the first restore reads the image from the disk, the scaled one finds it in memory
    t0 = time.time()
    stack.apply(dgd_manifest("gpu", main_dgd, volumes, {"enabled": True, "checkpointRef": "gpu-worker",
                                                        "startupPolicy": "WaitForCheckpoint"}))
    [(pod, restored)] = run.step("restore", wait_serving, stack, REF_SELECTOR, args.timeout)
    run.results["restored_apply_to_serving_s"] = round(time.time() - t0, 2)
    run.results.update(restored_pod=pod, restored_state=restored, restored_equals_cold=same_state(restored, cold_state))
    run.save()
    t0 = scale(stack, "gpu", 2)
    both = run.step("scale", wait_serving, stack, REF_SELECTOR, args.timeout, 2)
    run.results["scaled_pod_apply_to_serving_s"] = round(time.time() - t0, 2)
    run.results["scaled_equals_cold"] = all(same_state(state, cold_state) for _, state in both)
    run.results["cold_still_serving"] = same_state(ask_pod(stack, "cold"), cold_state)
    run.save()
    return run.results["restored_equals_cold"] and run.results["scaled_equals_cold"] and \
        run.results["cold_still_serving"]


def immediate_scale_up(stack: SnapshotStack, main_dgd: dict[str, Any], volumes: list[dict[str, Any]],
                       timeout: float) -> dict[str, Any]:
    """startupPolicy Immediate with an automatic checkpoint: a cold pod serves at once; once the checkpoint
    is Ready, scaling up adds a restored pod while the cold one keeps serving."""
    ns = stack.namespace
    stack.kubectl("delete", "dgd", "gpu", "-n", ns, "--wait=true", timeout=120)
    stack.kubectl("delete", "pod", "cold", "-n", ns, "--wait=true", timeout=120)
    stack.kubectl("wait", "--for=delete", "pod", "-l", f"{names.LABEL_DGD_NAME}=gpu", "-n", ns, "--timeout=90s",
                  check=False, timeout=120)
    selector = f"{names.LABEL_DGD_NAME}=imm,!{names.LABEL_IS_CHECKPOINT_SOURCE}"
    t0 = time.time()
    stack.apply(dgd_manifest("imm", main_dgd, volumes, {"enabled": True, "startupPolicy": "Immediate"}))
    [(cold_pod, cold_state)] = wait_serving(stack, selector, timeout)
    found: dict[str, Any] = {"cold_apply_to_serving_s": round(time.time() - t0, 2), "cold_pod": cold_pod}
    dgd = stack.wait_object(DYNAMO_GRAPH_DEPLOYMENTS, "imm", lambda d: ((d.get("status") or {}).get("checkpoints")
                            or {}).get("worker", {}).get("ready"), "the automatic checkpoint Ready", timeout)
    found["apply_to_checkpoint_ready_s"] = round(time.time() - t0, 2)
    found["checkpoint"] = dgd["status"]["checkpoints"]["worker"]
    t1 = scale(stack, "imm", 2)
    pods = dict(wait_serving(stack, selector, timeout, 2))
    found["scaled_pod_apply_to_serving_s"] = round(time.time() - t1, 2)
    restored = [state for name, state in pods.items() if name != cold_pod]
    found["restored_equals_cold"] = bool(restored) and all(same_state(s, cold_state) for s in restored) and \
        same_state(pods[cold_pod], cold_state)
    found["restored_pods"] = [name for name in pods if name != cold_pod]
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dynamo-snapshot-node"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights-gib", type=float, default=1.0)
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--network-lock", default="nftables")
    parser.add_argument("--torch-root", default="/opt/torch")
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--skip-mismatch", action="store_true", help="leave out the driver-mismatch refusal")
    parser.add_argument("--skip-immediate", action="store_true", help="leave out the Immediate DGD scale-up")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out)
    weights = args.work / "weights" / "weights.safetensors"
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        run.step("weights", subprocess.run, [sys.executable, str(REPO / "bench/gpu/weights.py"), "--out",
                                             str(weights), "--gib", str(args.weights_gib)], None, None, None, True)
    extra = {"/opt/workloads/worker.py": REPO / "bench/gpu/worker.py",
             "/opt/workloads/weights.py": REPO / "bench/gpu/weights.py"}
    stack = SnapshotStack(args.work / "s", namespace="gpu", extra_image_files=extra, gpu_plugin=["--replicas", "4"],
                          criu_config={"networkLock": args.network_lock, "timeoutSeconds": 300})
    main_container, volumes = container(weights, args.batch_sizes, args.torch_root)
    try:
        run.step("stack", stack.start)
        cold = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cold", "labels": {"run": "cold"}},
                "spec": {"restartPolicy": "Never", "containers": [main_container], "volumes": volumes}}
        t0 = time.time()
        stack.apply(cold)
        [(_, cold_state)] = run.step("cold", wait_serving, stack, "run=cold", args.timeout)
        run.results["cold_apply_to_serving_s"] = round(time.time() - t0, 2)
        run.results["cold_state"] = cold_state
        run.save()
        main_dgd = {k: v for k, v in main_container.items() if k != "name"}
        same = checkpoint_and_restore(run, stack, main_container, main_dgd, volumes, cold_state, args)
        if not args.skip_mismatch:
            run.results["mismatch"] = run.step("mismatch", refuse_on_other_driver, stack, REF_SELECTOR, args.timeout)
        if not args.skip_immediate:
            run.results["immediate"] = run.step("immediate", immediate_scale_up, stack, main_dgd, volumes,
                                                args.timeout)
            same = same and run.results["immediate"]["restored_equals_cold"]
        print(json.dumps({k: run.results.get(k) for k in (
            "cold_apply_to_serving_s", "checkpoint_apply_to_ready_s", "restored_apply_to_serving_s",
            "scaled_pod_apply_to_serving_s", "restored_equals_cold", "scaled_equals_cold", "cold_still_serving",
            "immediate")}))
        return 0 if same else 1
    except BaseException:
        return 1
    finally:
        run.results["agent_stage_events"] = [r for r in stack.agent_events() if "stage" in json.dumps(r)][-60:]
        run.save()
        subprocess.run(["tar", "-czf", str(args.out / "node-logs.tgz"), "-C", str(args.work / "s"), "cluster/logs",
                        "--ignore-failed-read"], capture_output=True)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
