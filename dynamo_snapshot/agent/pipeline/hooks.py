"""What a caller hears from, and contributes to, a running pipeline: one small interface handed to
``checkpoint()`` and ``restore()`` (as go-criu's Notify), with a null object for callers that need
nothing.

    on_stage(stage)        a stage starts (the stage's enum member; the metrics and test drivers use it)
    dump_started(pid)      CRIU's dump process is running (the agent measures ready-to-CRIU from it)
    confirm(directory)     after the promotion and before the release: the caller records the checkpoint
                           (the agent annotates the Job); raising fails the checkpoint and withdraws it
"""

from __future__ import annotations

import enum
from pathlib import Path


class Hooks:
    """The null hooks: every method does nothing. Subclass and override what you need."""

    async def on_stage(self, stage: enum.StrEnum) -> None:
        return None

    async def dump_started(self, pid: int) -> None:
        return None

    async def confirm(self, directory: Path) -> None:
        return None


NO_HOOKS = Hooks()
