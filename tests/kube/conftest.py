"""Fixtures of the kube tests: the anyio backend, an API client per test, the local cluster for tests that
restart its processes, and a TCP proxy in front of the API server (see support.TcpProxy)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import pytest

from dynamo_snapshot.kube import Client, ClusterConfig, load_kubeconfig
from tests.kube.support import TcpProxy


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp underneath: asyncio only


@pytest.fixture
def cluster_config(kubeconfig) -> ClusterConfig:
    return load_kubeconfig(kubeconfig)


@pytest.fixture
async def client(cluster_config) -> AsyncIterator[Client]:
    async with Client(cluster_config) as c:
        yield c


@pytest.fixture
def local_cluster(kube_cluster):
    """The local control plane, for tests that kill and restart its processes."""
    if kube_cluster is None:
        pytest.skip("restarts control-plane processes: needs the local cluster, not KUBECONFIG")
    return kube_cluster


@pytest.fixture
async def proxy(cluster_config) -> AsyncIterator[TcpProxy]:
    url = urlsplit(cluster_config.server)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 443)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.run)
        yield proxy
        tg.cancel_scope.cancel()
