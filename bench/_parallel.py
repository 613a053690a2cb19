"""What the benchmarks share: run many API calls a bounded number at a time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


async def in_parallel(count: int, make: Callable[[int], Awaitable[object]], concurrency: int = 64) -> None:
    """Run make(i) for every i in range(count), `concurrency` at a time."""
    send, receive = anyio.create_memory_object_stream[int](count)
    for i in range(count):
        send.send_nowait(i)
    send.close()

    async def worker() -> None:
        async for i in receive:
            await make(i)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
