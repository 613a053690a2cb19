"""Process lifecycle for the long-running commands: SIGTERM and SIGINT cancel the top-level task group,
so every `finally` runs (the leader Lease is released, in-flight writes finish or are abandoned cleanly)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import structlog

log = structlog.get_logger("dynamo_snapshot.lifecycle")


async def run_until_signalled(main: Callable[[], Awaitable[None]]) -> bool:
    """Run `main` until it returns or a stop signal arrives. Returns True if a signal stopped it."""
    stopped = False
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            nonlocal stopped
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    stopped = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        await main()
        tg.cancel_scope.cancel()
    return stopped


@contextlib.asynccontextmanager
async def background(name: str = "background") -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group for helpers that report their own failures (through a result the body awaits):
    an exception of the body leaves it as itself, not wrapped in an ExceptionGroup, so callers keep
    catching the errors they know; the helpers are cancelled with it."""
    try:
        async with anyio.create_task_group() as group:
            yield group
    except BaseExceptionGroup as errors:
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise
