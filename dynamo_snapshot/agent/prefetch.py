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
    def __init__(self, paths: Iterable[Path], threads: int = 8, chunk: int = DEFAULT_CHUNK, idle_io: bool = True):
        self.paths = [Path(p) for p in paths]
        self.threads = max(1, threads)
        self.chunk = chunk
        self.idle_io = idle_io
        self._jobs: queue.SimpleQueue[tuple[Path, int, int] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._bytes = 0
        self._errors: list[str] = []
        self._started = 0.0
        self._finished = 0.0
        self._stop = threading.Event()

    def start(self) -> Prefetch:
        self._started = time.monotonic()
        for path in self.paths:
            try:
                size = path.stat().st_size
            except OSError as exc:
                self._errors.append(f"{path}: {exc.strerror}")
                continue
            for offset in range(0, size, self.chunk):
                self._jobs.put((path, offset, min(self.chunk, size - offset)))
        for _ in range(self.threads):
            self._jobs.put(None)
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"prefetch-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def _run(self) -> None:
        if self.idle_io:
            _idle_io_priority()
        buf = bytearray(self.chunk)
        view = memoryview(buf)
        fds: dict[Path, int] = {}
        try:
            while not self._stop.is_set():
                job = self._jobs.get()
                if job is None:
                    break
                path, offset, length = job
                try:
                    fd = fds.get(path)
                    if fd is None:
                        fd = fds[path] = os.open(path, os.O_RDONLY)
                    done = 0
                    while done < length:
                        n = os.preadv(fd, [view[: length - done]], offset + done)
                        if n <= 0:
                            break
                        done += n
                except OSError as exc:
                    with self._lock:
                        self._errors.append(f"{path}@{offset}: {exc.strerror}")
                    continue
                with self._lock:
                    self._bytes += done
        finally:
            for fd in fds.values():
                os.close(fd)
            with self._lock:
                self._finished = time.monotonic()

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
