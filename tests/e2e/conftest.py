"""One whole system per test module, all real: control plane, a kubelet node on containerd, the operator
and the snapshot agent (``dynamo_snapshot.devcluster.stack``), in the module's ``STORAGE_MODE``
(agentMount by default; s3: with MinIO), installed from the charts when the module sets ``INSTALLED = True``,
with a node cache of ``NODE_CACHE_GIB`` (none by default) and the operator's ``checkpoint.staging.maxNodes``
``STAGING_MAX_NODES`` (the operator's default unless set).
Skips with the reason when this machine cannot run it (not root, no containerd, no CRIU, no kubelet)."""

from __future__ import annotations

import shutil
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
    cache_gib = getattr(request.module, "NODE_CACHE_GIB", 0)
    max_nodes = getattr(request.module, "STAGING_MAX_NODES", None)
    # The node tests' counter (it can hold an io_uring, which CRIU cannot dump) rides along in the image.
    extra = {"/opt/workloads/counter.py": WORKLOADS / "counter.py"}
    root = tmp_path_factory.mktemp("stack")
    failed_before = request.session.testsfailed
    with SnapshotStack(root, namespace="e2e", storage_mode=mode, extra_image_files=extra,
                       installed=install, node_cache_gib=cache_gib, staging_max_nodes=max_nodes).running() as s:
        yield s  # a wait that times out explains the stack's state in its message (SnapshotStack.explain)
    if request.session.testsfailed == failed_before:
        # a module that passed leaves no checkpoints behind (the agent-kill module writes GiBs, and pytest
        # keeps the last runs' temporary directories); a failed one keeps them to be looked at
        for written in ("checkpoints", "objects", "node-cache", "minio"):  # s3: before upload, fetched, the bucket
            shutil.rmtree(root / written, ignore_errors=True)


@pytest.fixture
def flow(stack: SnapshotStack) -> Flow:
    return Flow(stack)
