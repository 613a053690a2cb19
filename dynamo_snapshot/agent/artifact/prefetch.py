"""Read files into the page cache ahead of a sequential reader, with several readers in parallel.

CRIU reads its page images, and a restored worker its weight files, one stream at a time; local
NVMe and network storage deliver their bandwidth only to many requests in flight. A ``Prefetch``
reads the files in file order, chunk by chunk, with ``threads`` readers in the background, so the
sequential reader behind it finds the pages cached. It only reads: nothing is trusted from it.

Its readers ask for the idle I/O class (where the block scheduler honours it) so that the small,
latency-bound reads of a CRIU restore running at the same time go first.
"""

from __future__ import annotations

import ctypes
import os
import platform
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from dynamo_snapshot.agent.host import confined
from dynamo_snapshot.agent.host.confined import OpenFile

log = structlog.get_logger(__name__)

DEFAULT_CHUNK = 16 << 20
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_IDLE = 3 << 13  # IOPRIO_PRIO_VALUE(IOPRIO_CLASS_IDLE, 0)


def _idle_io_priority() -> None:
    """Put the calling thread in the idle I/O class (best effort)."""
    number = _IOPRIO_SET.get(platform.machine())
    if number is not None:
        ctypes.CDLL(None, use_errno=True).syscall(number, 1, 0, _IOPRIO_IDLE)  # IOPRIO_WHO_PROCESS, this thread


@dataclass(frozen=True)
class PrefetchResult:
    bytes_read: int
    seconds: float
    errors: tuple[str, ...] = ()

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


class Prefetch:
    """Reads ``paths`` (files, or directories standing for the files below them) as seen inside
    ``root`` (default ``/``; a container's ``/proc/<pid>/root``, never left: see ``confined``)."""

    def __init__(
        self,
        paths: Iterable[Path | str],
        threads: int = 8,
        chunk: int = DEFAULT_CHUNK,
        idle_io: bool = True,
        root: Path | str = "/",
    ):
        self.paths = [str(p) for p in paths]
        self.root = Path(root)
        self.threads = max(1, threads)
        self.chunk = chunk
        self.idle_io = idle_io
        self._jobs: queue.SimpleQueue[tuple[OpenFile, int, int] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._bytes = 0
        self._files: list[OpenFile] = []
        self._errors: list[str] = []
        self._started = 0.0
        self._finished = 0.0
        self._running = 0
        self._stop = threading.Event()

    def start(self) -> Prefetch:
        """Start reading in the background: one thread opens the files (which may be slow on network
        storage) and queues their chunks in file order, ``threads`` readers read them."""
        self._started = time.monotonic()
        self._running = self.threads + 1  # the readers and the planner: the last one out closes the files
        planner = threading.Thread(target=self._plan, name="prefetch-plan", daemon=True)
        planner.start()
        self._workers.append(planner)
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"prefetch-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def _plan(self) -> None:
        errors: list[str] = []
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            errors.append(f"{self.root}: {exc.strerror}")
        else:
            try:
                for opened in confined.regular_files(root_fd, self.paths, errors):
                    with self._lock:
                        self._files.append(opened)
                    if self._stop.is_set():
                        break
                    for offset in range(0, opened.size, self.chunk):
                        if self._stop.is_set():
                            break
                        self._jobs.put((opened, offset, min(self.chunk, opened.size - offset)))
            finally:
                os.close(root_fd)
        with self._lock:
            self._errors.extend(errors)
        for _ in range(self.threads):
            self._jobs.put(None)
        self._leave(reader=False)

    def _run(self) -> None:
        if self.idle_io:
            _idle_io_priority()
        buf = bytearray(self.chunk)
        view = memoryview(buf)
        try:
            while not self._stop.is_set():
                job = self._jobs.get()
                if job is None:
                    break
                opened, offset, length = job
                done = 0
                try:
                    while done < length:
                        n = os.preadv(opened.fd, [view[: length - done]], offset + done)
                        if n <= 0:
                            break
                        done += n
                except OSError as exc:
                    with self._lock:
                        self._errors.append(f"{opened.path}@{offset}: {exc.strerror}")
                with self._lock:
                    self._bytes += done
        finally:
            self._leave(reader=True)

    def _leave(self, reader: bool) -> None:
        with self._lock:
            self._running -= 1
            if reader:
                self._finished = time.monotonic()
            if self._running:
                return
            files, self._files = self._files, []
            errors, read = len(self._errors), self._bytes
        for opened in files:
            os.close(opened.fd)
        log.info(
            "prefetch finished",
            files=len(files),
            bytes=read,
            seconds=round(time.monotonic() - self._started, 3),
            errors=errors,
            stopped=self._stop.is_set(),
        )

    def stop(self) -> None:
        """Stop after the chunks being read (a failed restore needs no more reads)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> PrefetchResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            end = self._finished or time.monotonic()
            result = PrefetchResult(self._bytes, end - self._started, tuple(self._errors))
        if result.errors:
            log.warning("prefetch could not read everything", errors=list(result.errors[:5]))
        return result
