"""The README's main job (`make run`): the whole flow on this machine, all real, step by step.

The local control plane, a kubelet node on containerd, the operator and the snapshot agent as local
processes; then a DynamoCheckpoint of a CPU worker goes Ready, a DGD with WaitForCheckpoint comes up
with restored pods, and a DGD with Immediate starts cold and restores the pods a scale-up adds. Where
the node cannot run (not root, no containerd or CRIU), it says why and shows the control-plane part.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dynamo_snapshot.devcluster import ClusterError, LocalCluster, MissingBinaries
from dynamo_snapshot.devcluster.cluster import install_crds
from dynamo_snapshot.hashing import identity_hash

if TYPE_CHECKING:  # the devcluster extra is imported only when the demo runs
    from dynamo_snapshot.devcluster.scenarios import CheckpointRun, Flow, RestoredPod
    from dynamo_snapshot.devcluster.stack import SnapshotStack

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "helm" / "operator" / "crds"
EXAMPLE = REPO / "examples" / "dynamocheckpoint.yaml"
DEMO_NAMESPACE = "dynamo-demo"
HEAP_MIB = 256


class Steps:
    """Numbered progress lines with the time since the start."""

    def __init__(self) -> None:
        self.number = 0
        self.started = time.monotonic()

    def step(self, text: str) -> None:
        self.number += 1
        print(f"[{time.monotonic() - self.started:6.1f}s] {self.number}. {text}", flush=True)

    def detail(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"           {line}", flush=True)


def run_demo(*, keep: bool, workdir: str, storage: str = "agentMount") -> int:
    from dynamo_snapshot import logs
    from dynamo_snapshot.devcluster.stack import missing

    logs.configure("warning")  # the steps are the output; the processes keep their own logs
    root = Path(workdir)
    if root.exists() and not keep:
        shutil.rmtree(root)  # a fresh cluster each run, so the demo shows the whole flow
    steps = Steps()
    reason = missing()
    if storage == "s3" and not reason:
        from dynamo_snapshot.devcluster import minio

        if why := minio.missing():
            print(f"error: --s3: {why}", flush=True)
            return 2
    if reason:
        steps.step(f"the node part of the flow cannot run here: {reason}")
        steps.detail("showing the control-plane part only (run as root after hack/ci/containers.sh for all of it)")
        return _control_plane_only(steps, root, keep)
    return _whole_flow(steps, root, keep, storage)


def _start_stack(steps: Steps, stack: SnapshotStack) -> LocalCluster:
    from dynamo_snapshot.devcluster.stack import S3_BUCKET, S3_PREFIX

    steps.step("starting the local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)")
    cluster = stack.start_control_plane()
    steps.detail(f"API server {cluster.server}; CRDs installed")
    steps.step("starting a node: containerd + runc + bridge CNI and a real kubelet v1.34 registering with it")
    node = stack.start_node()
    steps.detail(cluster.kubectl("get", "nodes", "-o", "wide"))
    steps.step("starting the operator and the snapshot agent as local processes")
    stack.start_snapshot()
    if stack.minio is not None:
        steps.detail(f"MinIO on {stack.minio.endpoint}, bucket {S3_BUCKET}: checkpoints go to "
                     f"s3://{S3_BUCKET}/{S3_PREFIX}/<id> (written in {stack.objects} first); restores fetch "
                     f"into the node cache {stack.node_cache}")
    base = stack.objects if stack.minio is not None else stack.checkpoints
    steps.detail(f"agent: snapshot-agent --node-name={node.name} --storage-access-mode=agentMount "
                 f"--storage-base-path={base} (log {stack.agent_log})")
    return cluster


def _standalone_checkpoint(steps: Steps, stack: SnapshotStack, flow: Flow) -> CheckpointRun:
    from dynamo_snapshot.devcluster.scenarios import checkpoint_manifest

    steps.step(f"DynamoCheckpoint 'counter': a CPU worker that warms up a {HEAP_MIB} MiB heap, then says "
               "ready-for-snapshot")
    run = flow.create_checkpoint(checkpoint_manifest("counter", heap_mib=HEAP_MIB))
    steps.detail(stack.kubectl("get", "dckpt", "-n", DEMO_NAMESPACE))
    steps.detail(f"Ready in {run.seconds:.1f} s (apply -> Job -> pod -> warm-up -> dump -> agent confirms)")
    steps.detail(f"ready-for-snapshot -> CRIU starts: {run.ready_to_criu:.2f} s (kubelet readiness probe "
                 f"included); the agent's own part: {run.agent_overhead:.3f} s")
    steps.detail(f"agent: lease to confirmation {run.agent_total:.2f} s; stages "
                 + ", ".join(f"{k} {v:.2f}" for k, v in run.stages.items()))
    where = stack.get("dckpt", "counter")["status"].get("location") or stack.checkpoints / run.checkpoint_id
    steps.detail(f"artifact {where}/versions/1: {run.artifact_bytes >> 20} MiB")
    return run


def _waiting_dgd(steps: Steps, stack: SnapshotStack, flow: Flow) -> list[RestoredPod]:
    from dynamo_snapshot.devcluster.scenarios import component_selector, dgd_manifest

    steps.step("DGD 'waiting' (Auto + WaitForCheckpoint, 2 replicas): no worker starts before its checkpoint")
    started = time.time()
    stack.apply(dgd_manifest("waiting", replicas=2, policy="WaitForCheckpoint", heap_mib=HEAP_MIB))
    auto = flow.auto_checkpoint_name("waiting")
    waiting_run = flow.wait_checkpoint(auto, started)
    steps.detail(f"automatic checkpoint {auto} Ready after {waiting_run.seconds:.1f} s")
    pods = flow.wait_restored(component_selector("waiting"), 2, started)
    for pod in pods:
        steps.detail(f"{pod.name}: restored in {pod.agent_total:.2f} s by the agent, running "
                     f"{pod.seconds:.1f} s after the DGD was applied; worker instance {pod.instance} "
                     f"(checkpointed: {waiting_run.instance}), count {pod.count_at_restore}, "
                     f"heap intact: {pod.heap_ok}, hostname {pod.hostname}")
    return pods


def _immediate_dgd(steps: Steps, stack: SnapshotStack, flow: Flow) -> list[RestoredPod]:
    from dynamo_snapshot.devcluster.scenarios import component_selector, dgd_manifest

    steps.step("DGD 'immediate' (Auto + Immediate, 1 replica): the first worker starts cold")
    started = time.time()
    stack.apply(dgd_manifest("immediate", replicas=1, policy="Immediate", heap_mib=HEAP_MIB))
    cold = flow.wait_pods(component_selector("immediate"), lambda p: p["status"].get("phase") == "Running", 1,
                          "the cold worker to run")[0]
    immediate_run = flow.wait_checkpoint(flow.auto_checkpoint_name("immediate"), started)
    steps.detail(f"cold worker {cold['metadata']['name']} running; checkpoint Ready after "
                 f"{immediate_run.seconds:.1f} s")
    steps.step("scaling 'immediate' to 3: the new workers restore, the cold one keeps running")
    scaled = flow.scale("immediate", 3)
    restored = flow.wait_restored(component_selector("immediate"), 2, scaled)
    for pod in restored:
        steps.detail(f"{pod.name}: running {pod.seconds:.1f} s after the scale-up (agent {pod.agent_total:.2f} s)")
    still = stack.get("pod", cold["metadata"]["name"])
    steps.detail(f"{cold['metadata']['name']}: {still['status']['phase']}, restarts "
                 f"{still['status']['containerStatuses'][0]['restartCount']}, never restored")
    steps.detail(stack.kubectl("get", "pods", "-n", DEMO_NAMESPACE, "-o", "wide"))
    return restored


def _whole_flow(steps: Steps, root: Path, keep: bool, storage: str = "agentMount") -> int:
    from dynamo_snapshot.devcluster.scenarios import CheckpointFailed, Flow
    from dynamo_snapshot.devcluster.stack import SnapshotStack

    stack = SnapshotStack(root, namespace=DEMO_NAMESPACE, storage_mode=storage)
    try:
        cluster = _start_stack(steps, stack)
        flow = Flow(stack)
        run = _standalone_checkpoint(steps, stack, flow)
        pods = _waiting_dgd(steps, stack, flow)
        restored = _immediate_dgd(steps, stack, flow)

        steps.step("summary")
        steps.detail(f"checkpoint end to end (apply -> Ready): {run.seconds:.1f} s; agent overhead from Ready "
                     f"to CRIU: {run.agent_overhead * 1000:.0f} ms")
        all_restored = pods + restored
        steps.detail("restore by the agent: " + ", ".join(f"{p.agent_total:.2f} s" for p in all_restored))
        steps.detail("scale-up to running worker: " + ", ".join(f"{p.seconds:.1f} s" for p in restored))
        if keep:
            steps.step(f"left running: export KUBECONFIG={cluster.kubeconfig}")
            steps.detail(f"stop it: kill the processes whose command line names {root}, then "
                         f"python -m dynamo_snapshot.devcluster.node clean {root}")
            return 0
    except (MissingBinaries, ClusterError, TimeoutError, CheckpointFailed) as err:
        print(f"error: {err}", flush=True)
        for log in (stack.agent_log, stack.operator_log):
            if log.exists():
                print(f"--- last lines of {log} ---\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return 1
    finally:
        if not keep:
            steps.step("stopping everything (agent, operator, kubelet, containerd, control plane)")
            stack.stop()
    return 0


def _control_plane_only(steps: Steps, root: Path, keep: bool) -> int:
    try:
        steps.step("starting the local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)")
        cluster = LocalCluster(root)
        cluster.start()
    except (MissingBinaries, ClusterError) as err:
        print(f"error: {err}")
        return 1
    try:
        steps.detail(f"API server {cluster.server}, kubeconfig {cluster.kubeconfig}")
        steps.step("installing the CRDs (DynamoCheckpoint, DynamoGraphDeployment)")
        install_crds(cluster.kubectl, CRD_DIR)
        columns = "custom-columns=NAME:.metadata.name,SHORT:.spec.names.shortNames"
        steps.detail(cluster.kubectl("get", "crd", "-o", columns))
        cluster.kubectl("create", "namespace", DEMO_NAMESPACE)
        steps.step(f"applying {EXAMPLE.relative_to(REPO)} in namespace {DEMO_NAMESPACE}")
        steps.detail(cluster.kubectl("apply", "-n", DEMO_NAMESPACE, "-f", str(EXAMPLE)))
        steps.step("the checkpoint as the API server stores it (defaults applied)")
        stored = json.loads(cluster.kubectl("get", "dckpt", "-n", DEMO_NAMESPACE, "-o", "json"))["items"][0]
        steps.detail(json.dumps({"identity": stored["spec"]["identity"],
                                 "job": {k: v for k, v in stored["spec"]["job"].items() if k != "podTemplateSpec"}},
                                indent=2))
        steps.detail(f"legacy identity hash (the checkpoint ID the operator resolves): "
                     f"{identity_hash(stored['spec']['identity'])}")
        steps.detail(cluster.kubectl("get", "dckpt", "-n", DEMO_NAMESPACE))
        if keep:
            steps.step(f"cluster left running: export KUBECONFIG={cluster.kubeconfig.resolve()}")
            steps.detail(f"stop it with: make stop (or kill the processes listed in {root}/logs)")
            return 0
    finally:
        if not keep:
            steps.step("stopping the local control plane")
            cluster.stop()
    return 0
