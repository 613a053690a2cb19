"""Stage bookkeeping shared by the checkpoint and restore pipelines: a log line and an observer call
when a stage starts, its duration when it ends."""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

S = TypeVar("S", bound=enum.StrEnum)


class Stages(Generic[S]):
    def __init__(self, pipeline: str, log: Any, observer: Callable[[S], Awaitable[None]] | None):
        self.pipeline = pipeline
        self.log = log
        self.observer = observer
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    async def enter(self, stage: S) -> None:
        self._started[stage.value] = time.monotonic()
        self.log.info(f"{self.pipeline} stage", stage=stage.value)
        await self.notify(stage)

    async def notify(self, stage: S) -> None:
        """Tell the observer without timing anything (a point inside a stage)."""
        if self.observer is not None:
            await self.observer(stage)

    def leave(self, stage: S) -> None:
        self.seconds[stage.value] = time.monotonic() - self._started.pop(stage.value)
