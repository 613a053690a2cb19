"""Structured concurrency: cancelling the top-level task group stops everything - informers, controller
workers mid-reconcile, leader election, watches - and leaves no task and no socket behind."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import anyio
import pytest

from dynamo_snapshot.kube import (
    CONFIGMAPS,
    LEASES,
    PODS,
    Client,
    Controller,
    EventRecorder,
    InformerFactory,
    LeaderElector,
)
from tests.kube.support import sockets_to

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_cancelling_the_top_level_group_leaves_no_tasks_or_sockets(cluster_config, namespace):
    port = urlsplit(cluster_config.server).port or 443
    sockets_before = sockets_to(port)
    tasks_before = asyncio.all_tasks()
    in_reconcile = anyio.Event()

    async with Client(cluster_config) as client:
        await client.create(CONFIGMAPS, {"metadata": {"name": "stuck"}}, namespace)
        informers = InformerFactory(client)
        configmaps = informers.informer(CONFIGMAPS, namespace=namespace)
        informers.informer(PODS, namespace=namespace)
        recorder = EventRecorder(client, controller="nvidia.com/lifecycle-test")

        async def reconcile(key) -> None:
            obj = configmaps.store.get_by_name(key.namespace, key.name)
            if key.name == "stuck":
                await recorder.normal(obj, "Stuck", "reconciling forever")
                in_reconcile.set()
                await anyio.sleep_forever()  # cancelled mid-reconcile

        controller = Controller("lifecycle", reconcile, workers=3)
        controller.watch(configmaps)
        elector = LeaderElector(client, name="lifecycle", namespace=namespace, lease_duration=15,
                                renew_deadline=10, retry_period=2)

        async def leading() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(informers.run)
                tg.start_soon(controller.run)

        async with anyio.create_task_group() as top:
            top.start_soon(elector.run, leading)
            with anyio.fail_after(60):
                await in_reconcile.wait()
            assert sockets_to(port) > sockets_before  # two watches and the request pool, at least
            top.cancel_scope.cancel()

        lease = await client.get(LEASES, "lifecycle", namespace)
        assert not lease["spec"].get("holderIdentity")  # released on the way out

    leftover = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
    assert leftover == set()
    assert sockets_to(port) == sockets_before
