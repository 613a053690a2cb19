"""The work queue and its rate limiters (no cluster needed)."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from dynamo_snapshot.kube import (
    BucketRateLimiter,
    ExponentialFailureRateLimiter,
    MaxOfRateLimiter,
    ShutDown,
    WorkQueue,
    default_rate_limiter,
)
from tests.kube.support import FakeClock

pytestmark = pytest.mark.anyio



def test_exponential_limiter_doubles_from_5ms_to_1000s_and_forget_resets():
    limiter = ExponentialFailureRateLimiter(0.005, 1000.0)
    delays = [limiter.when("k") for _ in range(20)]
    assert delays[:4] == [0.005, 0.01, 0.02, 0.04]
    assert delays[-1] == 1000.0 and max(delays) == 1000.0
    assert limiter.num_requeues("k") == 20
    assert limiter.when("other") == 0.005  # per item
    limiter.forget("k")
    assert limiter.num_requeues("k") == 0
    assert limiter.when("k") == 0.005


def test_bucket_limiter_allows_a_burst_of_100_then_10_per_second():
    clock = FakeClock()
    limiter = BucketRateLimiter(10.0, 100, clock=clock)
    assert all(limiter.when(i) == 0.0 for i in range(100))
    assert limiter.when("101st") == pytest.approx(0.1)
    assert limiter.when("102nd") == pytest.approx(0.2)
    clock.now += 10.0  # refills, but never beyond the burst
    assert all(limiter.when(i) == 0.0 for i in range(98))


def test_default_limiter_is_the_max_of_both():
    clock = FakeClock()
    limiter = MaxOfRateLimiter(ExponentialFailureRateLimiter(0.005, 1000.0), BucketRateLimiter(10.0, 100, clock=clock))
    assert limiter.when("k") == 0.005  # bucket has tokens: the per-item backoff decides
    for i in range(200):
        limiter.when(f"x{i}")
    assert limiter.when("fresh") > 1.0  # bucket exhausted: it decides, even for a fresh item
    assert isinstance(default_rate_limiter(), MaxOfRateLimiter)


def test_failures_while_the_server_was_away_leave_the_overall_budget_untouched():
    """An API server restart fails every reconcile with a transport error: ~600 retries drawn from the
    bucket left a fresh key 50 s in debt; retried with budget=False, only the per-key backoff applies."""
    clock = FakeClock()
    limiter = MaxOfRateLimiter(ExponentialFailureRateLimiter(0.005, 1000.0), BucketRateLimiter(10.0, 100, clock=clock))
    for i in range(600):
        assert limiter.when(f"x{i}", budget=False) == 0.005
    assert limiter.num_requeues("x1") == 1  # the key's own backoff still counts
    assert limiter.when("fresh") == 0.005  # no debt: the bucket still holds its burst
    assert all(limiter.when(i) == 0.005 for i in range(98))


async def test_a_transport_error_is_retried_without_drawing_on_the_overall_budget():
    from dynamo_snapshot.kube import Controller, TransportError

    clock = FakeClock()
    limiter = MaxOfRateLimiter(ExponentialFailureRateLimiter(0.005, 1000.0), BucketRateLimiter(10.0, 100, clock=clock))

    async def reconcile(key: str) -> None:
        raise TransportError("GET", f"/api/v1/{key}", OSError("connection refused"))

    controller = Controller("away", reconcile, rate_limiter=limiter)
    for i in range(300):
        await controller._reconcile(f"k{i}")
    assert limiter.when("fresh") == 0.005  # 300 failed retries spent nothing of the 100-burst bucket


async def test_a_key_is_queued_once_however_often_added():
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(1000):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert await queue.get() == "a"
    assert await queue.get() == "b"
    assert len(queue) == 0


async def test_a_key_added_while_processing_runs_once_more_after_done():
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    for _ in range(100):
        queue.add("a")
    assert len(queue) == 0  # not handed to a second worker while the first has it
    queue.done(key)
    assert len(queue) == 1
    assert await queue.get() == "a"
    queue.done("a")
    assert len(queue) == 0


async def test_two_workers_never_hold_the_same_key():
    queue: WorkQueue[str] = WorkQueue()
    holding: set[str] = set()
    overlaps = processed = 0
    enough = anyio.Event()

    async def worker():
        nonlocal overlaps, processed
        while True:
            try:
                key = await queue.get()
            except ShutDown:
                return
            overlaps += key in holding
            holding.add(key)
            await anyio.lowlevel.checkpoint()  # let the other workers run while this one holds the key
            processed += 1
            if processed < 60:
                queue.add(key)  # re-added while held
            else:
                enough.set()
            holding.discard(key)
            queue.done(key)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(worker)
        for key in "abc":
            queue.add(key)
        with anyio.fail_after(10):
            await enough.wait()
        await queue.shutdown_with_drain()
    assert overlaps == 0


async def test_add_after_delays_and_the_earlier_time_wins():
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("late", 0.3)
    queue.add_after("soon", 3600)
    queue.add_after("soon", 0.05)  # earlier wins
    queue.add_after("soon", 7200)  # later loses
    assert len(queue) == 0 and queue.waiting == 2
    with anyio.fail_after(10):
        assert await queue.get() == "soon"
        assert await queue.get() == "late"


async def test_add_rate_limited_backs_off_and_forget_resets():
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(3):
        queue.add_rate_limited("k")
    assert queue.num_requeues("k") == 3
    with anyio.fail_after(10):
        assert await queue.get() == "k"
    queue.forget("k")
    queue.done("k")
    assert queue.num_requeues("k") == 0


async def test_shutdown_drains_queued_keys_then_raises_and_ignores_adds():
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    queue.add("b")
    queue.add_after("never", 3600)
    queue.shutdown()
    queue.add("c")  # ignored
    assert await queue.get() == "a"
    assert await queue.get() == "b"
    with pytest.raises(ShutDown):
        await queue.get()


async def test_shutdown_wakes_waiting_workers():
    queue: WorkQueue[str] = WorkQueue()
    results = []

    async def worker():
        try:
            await queue.get()
        except ShutDown:
            results.append("stopped")

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        tg.start_soon(worker)
        await anyio.wait_all_tasks_blocked()
        queue.shutdown()
    assert results == ["stopped", "stopped"]


async def test_shutdown_with_drain_waits_for_keys_in_progress():
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    drained = False

    async def drain():
        nonlocal drained
        await queue.shutdown_with_drain()
        drained = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        await anyio.wait_all_tasks_blocked()
        assert not drained
        queue.done(key)
    assert drained
