"""Fixtures for the node-machinery tests: one real containerd + runc node per session and CRIU.
Tests whose real parts are missing on this machine skip with the reason (``node_harness.missing``).
The object-storage tests get a real MinIO on loopback (``minio_server``, ``bucket``); the agent's services
an asyncio client of the real API server (``client``, with ``pytest.mark.anyio``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.devcluster import minio
from dynamo_snapshot.kube import Client, load_kubeconfig
from tests.agent import node_harness as harness


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Node]:
    reason = harness.missing()
    if reason:
        pytest.skip(reason)
    with harness.running_node(tmp_path_factory.mktemp("node")) as running:
        yield running


@pytest.fixture(scope="session")
def bundle() -> criu.CriuBundle:
    reason = harness.missing()
    if reason:
        pytest.skip(reason)
    return criu.CriuBundle.locate()


@pytest.fixture
def pods(node: harness.Node, tmp_path: Path) -> Iterator[harness.Pods]:
    made = harness.Pods(node, tmp_path)
    before = set(id(p) for p in node.pods)
    yield made
    for pod in [p for p in node.pods if id(p) not in before]:
        node.remove_pod(pod)


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[minio.Minio]:
    """A real MinIO on loopback for the session (hack/build-minio.sh builds it; skips with the reason if not)."""
    reason = minio.missing()
    if reason:
        pytest.skip(reason)
    with minio.running(tmp_path_factory.mktemp("minio")) as server:
        yield server


@pytest.fixture
def bucket(minio_server: minio.Minio, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test (on a server that is up: a test that stops it and fails before starting it
    again does not take the tests after it down too)."""
    if minio_server.process is None or minio_server.process.poll() is not None:
        minio_server.start()
    return minio_server.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(kubeconfig) -> AsyncIterator[Client]:
    """A client of the session's real API server (``kubeconfig``), for ``pytest.mark.anyio`` tests."""
    async with Client(load_kubeconfig(kubeconfig)) as c:
        yield c
