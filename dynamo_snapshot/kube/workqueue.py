"""A rate-limited, de-duplicating work queue, as client-go's `util/workqueue`, for anyio.

Guarantees:
- a key is queued at most once, however often it is added before a worker takes it;
- a key is never processed by two workers at once: added while it is being processed, it is queued again
  when the worker calls `done`, and runs once more;
- `add_after` delays a key (an earlier time wins over a later one for the same key);
- `add_rate_limited` delays by the rate limiter: by default the larger of a per-key exponential backoff
  (5 ms doubling to 1000 s) and an overall token bucket (10 per second, bursts of 100); `forget` resets
  the key's backoff after a success; a failure because the server was away (`budget=False`) does not
  draw on the bucket, so an API server restart does not leave every later retry in debt;
- after `shutdown` adds are ignored, workers still get what is queued, then `get` raises ShutDown.
  `shutdown_with_drain` also waits for the keys being processed.

The queue needs no task of its own: `get` waits for the next key or for the next delayed key to come due.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

import anyio

from dynamo_snapshot.kube import metrics

__all__ = [
    "BucketRateLimiter",
    "ExponentialFailureRateLimiter",
    "MaxOfRateLimiter",
    "RateLimiter",
    "ShutDown",
    "WorkQueue",
    "default_rate_limiter",
]

K = TypeVar("K", bound=Hashable)


class ShutDown(Exception):
    """The queue is shut down and empty."""


class RateLimiter(Protocol):
    def when(self, item: Hashable, *, budget: bool = True) -> float:
        """How long to wait before the item may be processed again (records one failure). ``budget=False``:
        the failure was the server being away, not the item; it does not draw on an overall budget."""

    def forget(self, item: Hashable) -> None:
        """The item succeeded: start its backoff from the beginning next time."""

    def num_requeues(self, item: Hashable) -> int: ...


class ExponentialFailureRateLimiter:
    """Per item: base * 2**failures, capped."""

    def __init__(self, base: float = 0.005, cap: float = 1000.0):
        self.base = base
        self.cap = cap
        self._failures: dict[Hashable, int] = {}

    def when(self, item: Hashable, *, budget: bool = True) -> float:
        failures = self._failures.get(item, 0)
        self._failures[item] = failures + 1
        if failures > 64:  # 2**64 * base is far past any cap; avoid huge floats
            return self.cap
        return min(self.cap, self.base * (2 ** failures))

    def forget(self, item: Hashable) -> None:
        self._failures.pop(item, None)

    def num_requeues(self, item: Hashable) -> int:
        return self._failures.get(item, 0)


class BucketRateLimiter:
    """One token bucket for all items (golang.org/x/time/rate semantics: a reservation per call, so a burst
    beyond `burst` is spread at `qps`)."""

    def __init__(self, qps: float = 10.0, burst: int = 100, clock: Callable[[], float] = time.monotonic):
        self.qps = qps
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def when(self, item: Hashable, *, budget: bool = True) -> float:
        if not budget:
            return 0.0  # a restart's failed retries would otherwise leave every later retry in debt
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def forget(self, item: Hashable) -> None:
        pass

    def num_requeues(self, item: Hashable) -> int:
        return 0


class MaxOfRateLimiter:
    """The longest delay of several limiters (each one records the failure)."""

    def __init__(self, *limiters: RateLimiter):
        self.limiters = limiters

    def when(self, item: Hashable, *, budget: bool = True) -> float:
        return max(limiter.when(item, budget=budget) for limiter in self.limiters)

    def forget(self, item: Hashable) -> None:
        for limiter in self.limiters:
            limiter.forget(item)

    def num_requeues(self, item: Hashable) -> int:
        return max(limiter.num_requeues(item) for limiter in self.limiters)


def default_rate_limiter() -> MaxOfRateLimiter:
    """client-go's DefaultControllerRateLimiter: max(per-item 5 ms..1000 s, overall 10 qps / burst 100)."""
    return MaxOfRateLimiter(ExponentialFailureRateLimiter(0.005, 1000.0), BucketRateLimiter(10.0, 100))


class WorkQueue(Generic[K]):
    def __init__(self, name: str | None = None, *, rate_limiter: RateLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.rate_limiter = rate_limiter if rate_limiter is not None else default_rate_limiter()
        self.clock = clock
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._waiting: dict[K, float] = {}  # delayed keys: when they come due
        self._heap: list[tuple[float, int, K]] = []  # (due, seq, key); stale entries skipped
        self._seq = itertools.count()
        self._added_at: dict[K, float] = {}
        self._started_at: dict[K, float] = {}
        self._shutting_down = False
        self._wakeup: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        if name:
            self._depth = metrics.WORKQUEUE_DEPTH.labels(name)
            self._adds = metrics.WORKQUEUE_ADDS.labels(name)
            self._queue_latency = metrics.WORKQUEUE_QUEUE_DURATION.labels(name)
            self._work_duration = metrics.WORKQUEUE_WORK_DURATION.labels(name)
            self._retries = metrics.WORKQUEUE_RETRIES.labels(name)

    # -- state -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Keys ready to be taken (not the delayed ones, not the ones being processed)."""
        return len(self._queue)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    @property
    def waiting(self) -> int:
        """Delayed keys not yet due."""
        return len(self._waiting)

    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    # -- adding ----------------------------------------------------------------------------------------
    def add(self, key: K) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        self._added_at.setdefault(key, self.clock())
        if self.name:
            self._adds.inc()
        if key in self._processing:
            return  # queued again by done()
        self._queue.append(key)
        if self.name:
            self._depth.set(len(self._queue))
        self._notify()

    def add_after(self, key: K, delay: float) -> None:
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        due = self.clock() + delay
        current = self._waiting.get(key)
        if current is not None and current <= due:
            return  # already due sooner
        self._waiting[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        self._notify()  # a getter may be waiting for a later time

    def add_rate_limited(self, key: K, *, budget: bool = True) -> None:
        """Retry after the rate limiter's delay. ``budget=False`` for a failure that was the server being
        away (unreachable, 429, 5xx): the key's own backoff applies, the overall bucket is not drawn on."""
        if self.name:
            self._retries.inc()
        self.add_after(key, self.rate_limiter.when(key, budget=budget))

    def forget(self, key: K) -> None:
        self.rate_limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        return self.rate_limiter.num_requeues(key)

    def _promote_due(self) -> float | None:
        """Move due delayed keys to the queue; return seconds until the next one comes due (None: none)."""
        now = self.clock()
        while self._heap:
            due, _, key = self._heap[0]
            if self._waiting.get(key) != due:
                heapq.heappop(self._heap)  # superseded by an earlier add_after
                continue
            if due > now:
                return due - now
            heapq.heappop(self._heap)
            del self._waiting[key]
            self.add(key)
        return None

    # -- taking --------------------------------------------------------------------------------------------
    async def get(self) -> K:
        """The next key to process; call `done(key)` when finished. Raises ShutDown when shut down and empty."""
        while True:
            wait_for = None if self._shutting_down else self._promote_due()
            if self._queue:
                key = self._queue.popleft()
                self._processing.add(key)
                self._dirty.discard(key)
                now = self.clock()
                added = self._added_at.pop(key, now)
                self._started_at[key] = now
                if self.name:
                    self._depth.set(len(self._queue))
                    self._queue_latency.observe(now - added)
                return key
            if self._shutting_down:
                raise ShutDown
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            wakeup = self._wakeup
            with anyio.move_on_after(wait_for if wait_for is not None else float("inf")):
                await wakeup.wait()

    def done(self, key: K) -> None:
        self._processing.discard(key)
        started = self._started_at.pop(key, None)
        if self.name and started is not None:
            self._work_duration.observe(self.clock() - started)
        if key in self._dirty:
            self._queue.append(key)
            if self.name:
                self._depth.set(len(self._queue))
            self._notify()
        if not self._processing and self._drained is not None:
            self._drained.set()

    # -- stopping --------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Ignore adds from now on; delayed keys are dropped; getters drain the queue, then get ShutDown."""
        self._shutting_down = True
        self._waiting.clear()
        self._heap.clear()
        self._notify()

    async def shutdown_with_drain(self) -> None:
        """shutdown(), then wait until every key being processed is done."""
        self.shutdown()
        while self._processing:
            if self._drained is None:
                self._drained = anyio.Event()
            drained = self._drained
            await drained.wait()
            self._drained = None
