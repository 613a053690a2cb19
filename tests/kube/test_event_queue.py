"""The event recorder served by its sender task: recording does not wait for the API server, events
arrive in order, a burst beyond the queue is dropped and counted (never unbounded memory), and what is
queued when the controller stops is still written."""

from __future__ import annotations

import anyio
import pytest

from dynamo_snapshot.kube import CONFIGMAPS, EVENTS_V1, Client, EventRecorder, Informer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def notes(client: Client, namespace: str) -> list[str]:
    events = (await client.list(EVENTS_V1, namespace)).items
    return [e["note"] for e in sorted(events, key=lambda e: e["eventTime"])]


async def test_recorded_events_are_written_in_order_by_the_sender(client: Client, namespace):
    target = await client.create(CONFIGMAPS, {"metadata": {"name": "target"}}, namespace)
    recorder = EventRecorder(client, controller="nvidia.com/test-controller", instance="test-1")
    written = Informer(client, EVENTS_V1, namespace=namespace)
    async with anyio.create_task_group() as tg:
        await tg.start(written.run)
        await tg.start(recorder.run)
        for i in range(5):
            await recorder.normal(target, "Step", f"step {i}")
        with anyio.fail_after(30):
            await written.wait_until(lambda: len(written.store.list()) == 5)
        tg.cancel_scope.cancel()
    assert await notes(client, namespace) == [f"step {i}" for i in range(5)]
    assert recorder.dropped == 0


async def test_a_burst_beyond_the_queue_is_dropped_and_counted_and_the_rest_is_written_at_stop(
        client: Client, namespace):
    target = await client.create(CONFIGMAPS, {"metadata": {"name": "target"}}, namespace)
    recorder = EventRecorder(client, controller="nvidia.com/test-controller", instance="test-1", queue_size=3)
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        for i in range(5):  # no checkpoint between them: the sender has not taken any yet
            await recorder.warning(target, "Burst", f"burst {i}")
        tg.cancel_scope.cancel()  # the controller stops: the queued three are still written
    assert recorder.dropped == 2
    assert await notes(client, namespace) == ["burst 0", "burst 1", "burst 2"]


async def test_without_a_sender_an_event_is_written_before_recording_returns(client: Client, namespace):
    target = await client.create(CONFIGMAPS, {"metadata": {"name": "target"}}, namespace)
    await EventRecorder(client, controller="nvidia.com/test-controller").normal(target, "Now", "at once")
    assert await notes(client, namespace) == ["at once"]
