"""The raw page data of a checkpoint, verified in the background while a restore goes on.

Everything CRIU parses is verified before it runs; the raw page contents (``pages-<n>.img``, most of
the bytes) are only copied into memory, so CRIU may start on them while parallel readers check their
digests ahead of its sequential reads. The restore runs CRIU with ``--leave-stopped`` and lets the
tasks go only after ``result()``; a failure kills them before they ran an instruction. Used by the
container pipeline (``restore.py``) and the plain-process-tree one (``tree.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from dynamo_snapshot.agent.artifact.prefetch import Prefetch
from dynamo_snapshot.agent.artifact.verification import is_page_data, verify_digests


class PageCheck:
    def __init__(self, images: Path, manifest: dict[str, Any], io_threads: int | None):
        self.images, self.manifest, self.io_threads = images, manifest, io_threads
        self.seconds = 0.0
        self._error: Exception | None = None
        self._done = anyio.Event()

    async def run(self) -> None:
        started = anyio.current_time()
        try:
            await anyio.to_thread.run_sync(
                lambda: verify_digests(self.images, self.manifest, is_page_data, self.io_threads),
                abandon_on_cancel=True,
            )
        except Exception as exc:  # reported by check()/result(): CRIU's own failure may come first
            self._error = exc
        finally:
            self.seconds = anyio.current_time() - started
            self._done.set()

    def check(self) -> None:
        """Raise now if the page data already failed (so CRIU is not even started)."""
        if self._error is not None:
            raise self._error

    async def result(self) -> None:
        await self._done.wait()
        self.check()

    async def then_prefetch(self, warm: Prefetch) -> None:
        """Start reading a worker's declared files once the image is read (the disk is theirs then)."""
        await self._done.wait()
        if self._error is None:
            warm.start()


class Verified:
    """The null page check: every byte was verified before CRIU (no overlap)."""

    seconds = 0.0

    async def run(self) -> None:
        return None

    def check(self) -> None:
        return None

    async def result(self) -> None:
        return None

    async def then_prefetch(self, warm: Prefetch) -> None:
        warm.start()
