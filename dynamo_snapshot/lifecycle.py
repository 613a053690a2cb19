"""Process lifecycle for the long-running commands: SIGTERM and SIGINT cancel the top-level task group,
so every `finally` runs (the leader Lease is released, in-flight writes finish or are abandoned cleanly)."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

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
