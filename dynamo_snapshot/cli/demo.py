"""The README's main job: a real local control plane, the CRDs, and the checkpoint flow, step by step."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dynamo_snapshot.devcluster import ClusterError, LocalCluster, MissingBinaries
from dynamo_snapshot.hashing import identity_hash

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "helm" / "operator" / "crds"
EXAMPLE = REPO / "examples" / "dynamocheckpoint.yaml"
DEMO_NAMESPACE = "dynamo-demo"


class Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self) -> None:
        self.number = 0
        self.started = time.monotonic()

    def step(self, text: str) -> None:
        self.number += 1
        print(f"[{time.monotonic() - self.started:6.1f}s] {self.number}. {text}", flush=True)

    def detail(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"           {line}", flush=True)


def run_demo(*, keep: bool, workdir: str) -> int:
    steps = Steps()
    root = Path(workdir)
    if root.exists() and not keep:
        shutil.rmtree(root)  # a fresh cluster each run, so the demo shows the whole flow
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
        cluster.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRD_DIR))
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
