"""One whole system per test module, all real: control plane, a kubelet node on containerd, the operator
and the snapshot agent (``dynamo_snapshot.devcluster.stack``), in the module's ``STORAGE_MODE``
(agentMount by default; s3: with MinIO), installed from the charts when the module sets ``INSTALLED = True``.
Skips with the reason when this machine cannot run it (not root, no containerd, no CRIU, no kubelet)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_snapshot.devcluster import minio
from dynamo_snapshot.devcluster.scenarios import Flow
from dynamo_snapshot.devcluster.stack import SnapshotStack, missing

WORKLOADS = Path(__file__).resolve().parents[1] / "agent" / "workloads"


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnapshotStack]:
    reason = missing()
    if reason:
        pytest.skip(f"the end-to-end flow needs a real node: {reason}")
    mode = getattr(request.module, "STORAGE_MODE", "agentMount")
    if mode == "s3" and (reason := minio.missing()):
        pytest.skip(f"the object-storage flow needs MinIO: {reason}")
    install = getattr(request.module, "INSTALLED", False)
    # The node tests' counter (it can hold an io_uring, which CRIU cannot dump) rides along in the image.
    extra = {"/opt/workloads/counter.py": WORKLOADS / "counter.py"}
    root = tmp_path_factory.mktemp("stack")
    with SnapshotStack(root, namespace="e2e", storage_mode=mode, extra_image_files=extra,
                       installed=install).running() as s:
        yield s
        for what, text in (("agent", s.agent_log_text()), ("operator", s.operator_log_text())):
            print(f"--- last lines of the {what}'s log ---\n" + "\n".join(text.splitlines()[-30:]))
        # what a timed-out wait needs to be explained: where each pod got to, and the namespace's events
        print("--- pods ---\n" + s.kubectl("get", "pods", "-n", s.namespace, "-o", "wide", check=False))
        print("--- events ---\n" + s.kubectl("get", "events", "-n", s.namespace, "--sort-by=.lastTimestamp",
                                           check=False)[-6000:])


@pytest.fixture
def flow(stack: SnapshotStack) -> Flow:
    return Flow(stack)
