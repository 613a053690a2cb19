"""The controller runner against real informers: keys never block each other, bursts collapse, failures
retry with backoff, results requeue, and metrics and logs say what happened."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client import REGISTRY

from dynamo_snapshot.kube import CONFIGMAPS, Client, Controller, Informer, ObjectKey, Result, owner_keys

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


@asynccontextmanager
async def controller_running(client: Client, namespace: str, name: str, reconcile, *, workers: int = 1,
                             label_selector: str | None = None, mapper=None) -> AsyncIterator[Controller]:
    """A controller over the namespace's ConfigMaps, running (with its informer) inside the block."""
    informer = Informer(client, CONFIGMAPS, namespace=namespace, label_selector=label_selector)
    controller = Controller(name, reconcile, workers=workers)
    controller.watch(informer, mapper=mapper)
    async with anyio.create_task_group() as tg:
        tg.start_soon(informer.run)
        tg.start_soon(controller.run)
        yield controller
        tg.cancel_scope.cancel()


async def test_a_slow_reconcile_does_not_block_other_keys(client: Client, namespace):
    fast = [f"fast-{i}" for i in range(6)]
    for name in ["slow", *fast]:
        await client.create(CONFIGMAPS, {"metadata": {"name": name}}, namespace)
    release_slow = anyio.Event()
    slow_started = anyio.Event()
    fast_done = anyio.Event()
    slow_twice = anyio.Event()
    reconciled: Counter[str] = Counter()
    running: set[str] = set()
    overlaps: list[str] = []

    async def reconcile(key: ObjectKey) -> None:
        if key.name in running:
            overlaps.append(key.name)
        running.add(key.name)
        try:
            if key.name == "slow":
                slow_started.set()
                await release_slow.wait()
            reconciled[key.name] += 1
            if all(reconciled[n] for n in fast):
                fast_done.set()
            if reconciled["slow"] == 2:
                slow_twice.set()
        finally:
            running.discard(key.name)

    async with controller_running(client, namespace, "test-slow", reconcile, workers=2):
        with anyio.fail_after(60):
            await slow_started.wait()
            # While one worker is stuck on "slow", the other gets through every other key - and a change to
            # "slow" meanwhile does not hand it to a second worker.
            await client.patch(CONFIGMAPS, "slow", {"data": {"changed": "yes"}}, namespace)
            await fast_done.wait()
        assert reconciled["slow"] == 0 and "slow" in running
        release_slow.set()
        with anyio.fail_after(60):
            await slow_twice.wait()
            await anyio.wait_all_tasks_blocked()
        # Once for the start, once more for the change made meanwhile; never two at once.
        assert reconciled["slow"] == 2 and overlaps == []


async def test_a_burst_of_1000_adds_reconciles_a_bounded_number_of_times(client: Client, namespace):
    await client.create(CONFIGMAPS, {"metadata": {"name": "hot"}}, namespace)
    key = ObjectKey(namespace, "hot")
    count = 0
    in_reconcile = anyio.Event()
    release = anyio.Event()
    finished = anyio.Event()

    async def reconcile(k: ObjectKey) -> None:
        nonlocal count
        if k != key:
            return  # the namespace's kube-root-ca.crt
        count += 1
        if count == 1:
            in_reconcile.set()
            await release.wait()
        elif count == 2:
            finished.set()

    async with controller_running(client, namespace, "test-burst", reconcile, workers=4) as controller:
        with anyio.fail_after(60):
            await in_reconcile.wait()
            for _ in range(1000):  # the burst arrives while the key is being reconciled
                controller.enqueue(key)
            release.set()
            await finished.wait()
            await anyio.wait_all_tasks_blocked()
        assert count == 2  # the one in progress, and one more for everything that came meanwhile


async def test_failures_retry_with_backoff_and_results_requeue(client: Client, namespace):
    await client.create(CONFIGMAPS, {"metadata": {"name": "flaky"}}, namespace)
    await client.create(CONFIGMAPS, {"metadata": {"name": "periodic"}}, namespace)
    calls: Counter[str] = Counter()
    done = {"flaky": anyio.Event(), "periodic": anyio.Event()}
    requeues_after_success: list[int] = []
    errors_before = sample("controller_reconcile_errors_total", controller="test-retry")

    async def reconcile(key: ObjectKey) -> Result | None:
        calls[key.name] += 1
        if key.name == "flaky":
            if calls["flaky"] <= 3:
                raise RuntimeError(f"transient failure {calls['flaky']}")
            done["flaky"].set()
            return None
        if key.name == "periodic":
            if calls["periodic"] < 3:
                return Result(requeue_after=0.05)
            done["periodic"].set()
        return None

    async with controller_running(client, namespace, "test-retry", reconcile, workers=2) as controller:
        with anyio.fail_after(60):
            await done["flaky"].wait()
            await done["periodic"].wait()
            await anyio.wait_all_tasks_blocked()
        requeues_after_success.append(controller.queue.num_requeues(ObjectKey(namespace, "flaky")))
    assert calls["flaky"] == 4 and calls["periodic"] == 3
    assert requeues_after_success == [0]  # success forgot the backoff
    assert sample("controller_reconcile_errors_total", controller="test-retry") - errors_before == 3
    assert sample("workqueue_retries_total", name="test-retry") >= 3
    assert sample("controller_reconcile_total", controller="test-retry", result="requeue_after") >= 2
    assert sample("workqueue_work_duration_seconds_count", name="test-retry") >= 7


async def test_owner_mapping_enqueues_the_owner(client: Client, namespace):
    owner = await client.create(CONFIGMAPS, {"metadata": {"name": "owner"}}, namespace)
    seen: list[ObjectKey] = []
    got_owner = anyio.Event()

    async def reconcile(key: ObjectKey) -> None:
        seen.append(key)
        got_owner.set()

    async with controller_running(client, namespace, "test-owner", reconcile, label_selector="role=child",
                       mapper=owner_keys("ConfigMap")):
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
               "controller": True}
        await client.create(CONFIGMAPS, {"metadata": {"name": "child", "labels": {"role": "child"},
                                                      "ownerReferences": [ref]}}, namespace)
        with anyio.fail_after(30):
            await got_owner.wait()
        assert seen == [ObjectKey(namespace, "owner")]
