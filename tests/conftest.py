"""Shared fixtures: one real local control plane per test session, a namespace per test.

The control plane is built by hack/build-k8s.sh (CI runs it first). With KUBECONFIG set, tests use that
cluster instead and the tests that restart control-plane processes skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_snapshot.devcluster import LocalCluster, MissingBinaries
from dynamo_snapshot.devcluster import binaries as k8s_binaries
from dynamo_snapshot.devcluster.cluster import install_crds
from tests.keys import ensure_session_keys

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = REPO / "helm" / "operator" / "crds"


ensure_session_keys()


class Kubectl:
    """The real kubectl against the test cluster."""

    def __init__(self, binary: str, kubeconfig: Path):
        self.binary = binary
        self.kubeconfig = kubeconfig

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def __call__(self, *args: str, input: str | None = None) -> str:
        return self.run(*args, input=input).stdout


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory) -> Iterator[LocalCluster | None]:
    """The local control plane this session started, or None when KUBECONFIG points elsewhere."""
    if os.environ.get("KUBECONFIG"):
        yield None
        return
    try:
        k8s_binaries.require()
    except MissingBinaries as err:
        pytest.skip(f"no local control plane: {err}")
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kubeconfig(kube_cluster) -> Path:
    return kube_cluster.kubeconfig if kube_cluster else Path(os.environ["KUBECONFIG"])


@pytest.fixture(scope="session")
def kubectl(kubeconfig) -> Kubectl:
    local = k8s_binaries.bin_dir() / "kubectl"
    binary = str(local) if local.exists() else shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not available")
    ctl = Kubectl(binary, kubeconfig)
    install_crds(ctl, CRD_DIR)
    return ctl


@pytest.fixture
def namespace(kubectl, request) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)
