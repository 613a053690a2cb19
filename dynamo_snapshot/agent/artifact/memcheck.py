"""The page data checked where it ended up: in the restored processes' memory, before they run.

A writer of storage can show the background reader one page file and CRIU another (a rewrite between
the two reads). So the digests of the page data are not checked on storage but on what CRIU actually
copied into the restored processes, while their tasks are still stopped (``--leave-stopped``):

    layout    which bytes of which ``pages-<id>.img`` CRIU copied to which address of which process
              (``container/memimages.py``, from the verified private copies of CRIU's images); page
              files of shared memory were copied and verified with those (``private.py``)
    prefetch  while CRIU runs: parallel readers pull the stored page files into the page cache ahead of
              CRIU's reads (nothing is trusted from them)
    map       each checkpoint PID to its restored process (the target's ``host_pid``)
    hash      each manifest chunk of each page file put back together from ``/proc/<pid>/mem`` in file
              order, SHA-256, compared with the authenticated manifest; ``io_threads`` in parallel.
              The few ranges the kernel decides (vDSO, AIO rings, rseq areas: ``memimages``) are taken
              from the stored file instead: bytes the kernel replaces or rewrites anyway

A mismatch or an unreadable range fails the restore: the tasks never ran an instruction, the target
is killed. ``Verified`` is the null check (a node-cache hit: every byte verified when it was cached).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot.agent.artifact.manifest import DIGEST_CHUNK, chunk_ranges, default_io_threads
from dynamo_snapshot.agent.artifact.prefetch import Prefetch
from dynamo_snapshot.agent.container.memimages import PageLayout, ProcessPages
from dynamo_snapshot.agent.errors import ArtifactInvalid
from dynamo_snapshot.agent.host import procfs

_READ = 4 << 20

log = structlog.get_logger(__name__)


def _pieces(process: ProcessPages, start: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(file offset, address, length) runs of ``[start, start + length)`` of the process's page file."""
    offset, end = 0, start + length
    for span in process.spans:
        lo, hi = max(start, offset), min(end, offset + span.length)
        if lo < hi:
            yield lo, span.vaddr + lo - offset, hi - lo
        offset += span.length
        if offset >= end:
            return


def _split(address: int, length: int, kernel: tuple[tuple[int, int], ...]) -> Iterator[tuple[int, int, bool]]:
    """(address, length, from memory?) runs of one piece, the kernel's ranges cut out."""
    end = address + length
    for lo, hi in kernel:
        if hi <= address or lo >= end:
            continue
        if lo > address:
            yield address, lo - address, True
        cut = min(hi, end)
        yield max(address, lo), cut - max(address, lo), False
        address = cut
    if address < end:
        yield address, end - address, True


class _Reader:
    """One thread's reads into a reused buffer, each run fed to the hash as it comes."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(_READ))

    def feed(self, h: Any, fd: int, offset: int, length: int, what: Callable[[], str]) -> None:
        done = 0
        while done < length:
            want = min(_READ, length - done)
            try:
                n = os.preadv(fd, [self.view[:want]], offset + done)
            except OSError as exc:
                raise ArtifactInvalid(f"{what()} could not be read ({exc.strerror})") from None
            if n <= 0:
                raise ArtifactInvalid(f"{what()} ends {length - done} bytes short")
            h.update(self.view[:n])
            done += n


_readers = threading.local()


def chunk_digest(process: ProcessPages, mem_fd: int, stored_fd: int, start: int, length: int) -> str:
    """SHA-256 of bytes ``[start, start + length)`` of the process's page file, as restored in memory."""
    reader = getattr(_readers, "reader", None) or _Reader()
    _readers.reader = reader
    h = hashlib.sha256()
    for offset, address, n in _pieces(process, start, length):
        for at, size, in_memory in _split(address, n, process.kernel):
            if in_memory:
                reader.feed(h, mem_fd, at, size,
                            lambda at=at, size=size: f"restored memory of process {process.pid} at {at:#x} (+{size})")
            else:
                reader.feed(h, stored_fd, offset + at - address, size, lambda: f"stored {process.pages}")
    return h.hexdigest()


def read_ahead(paths: list[Path], threads: int, stop: threading.Event) -> int:
    """Read the files, chunk by chunk in file order with ``threads`` readers, into the page cache (a
    sequential reader behind finds them cached); returns the bytes read. Nothing read is trusted."""
    jobs = []
    fds = []
    try:
        for path in paths:
            fds.append(fd := os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
            size = os.fstat(fd).st_size
            jobs += [(fd, start, n) for start, n in chunk_ranges(size, DIGEST_CHUNK) if n]

        def read(job: tuple[int, int, int]) -> int:
            fd, start, n = job
            reader = getattr(_readers, "reader", None) or _Reader()
            _readers.reader = reader
            done = 0
            while done < n and not stop.is_set():
                got = os.preadv(fd, [reader.view[: min(_READ, n - done)]], start + done)
                if got <= 0:
                    break
                done += got
            return done

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="page-prefetch") as pool:
            return sum(pool.map(read, jobs))
    finally:
        for fd in fds:
            os.close(fd)


def _expected(manifest: dict[str, Any], pages: str) -> list[tuple[int, int, str]]:
    entry = next((e for e in manifest.get("files") or [] if e.get("path") == pages), None)
    if entry is None:
        raise ArtifactInvalid(f"the manifest does not list {pages}, which a pagemap names")
    size = int(entry["size"])
    if "chunkBytes" in entry:
        ranges = chunk_ranges(size, int(entry["chunkBytes"]))
        return [(s, n, str(d)) for (s, n), d in zip(ranges, entry.get("chunkSha256") or [], strict=True)]
    return [(0, size, str(entry.get("sha256")))]


def verify_memory(stored: Path, layout: PageLayout, manifest: dict[str, Any], host_pid: Callable[[int], int | None],
                  io_threads: int | None = None) -> int:
    """Check every process's page data in its restored memory; returns the bytes checked."""
    fds: list[int] = []
    jobs: list[tuple[ProcessPages, int, int, int, int, str]] = []
    try:
        for process in layout.processes:
            expected = _expected(manifest, process.pages)
            if process.size != sum(n for _, n, _ in expected):
                raise ArtifactInvalid(f"{stored / process.pages} holds {sum(n for _, n, _ in expected)} bytes; "
                                      f"pagemap-{process.pid}.img places {process.size}")
            pid = host_pid(process.pid)
            if pid is None:
                raise ArtifactInvalid(f"process {process.pid} of the checkpoint is not among the restored ones")
            fds.append(mem := os.open(procfs.proc(pid) / "mem", os.O_RDONLY | os.O_CLOEXEC))
            fds.append(src := os.open(stored / process.pages, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            jobs += [(process, mem, src, start, n, digest) for start, n, digest in expected if n]

        def check(job: tuple[ProcessPages, int, int, int, int, str]) -> None:
            process, mem, src, start, n, want = job
            got = chunk_digest(process, mem, src, start, n)
            if got != want:
                raise ArtifactInvalid(
                    f"{stored / process.pages} bytes {start}-{start + n} as restored in process {process.pid}'s "
                    f"memory have SHA-256 {got}; the manifest says {want} (the page data changed on storage, "
                    f"or CRIU restored something else); refused before the restored tasks ran")

        with ThreadPoolExecutor(max_workers=max(1, io_threads or default_io_threads()),
                                thread_name_prefix="memcheck") as pool:
            list(pool.map(check, jobs))
        return sum(job[4] for job in jobs)
    finally:
        for fd in fds:
            os.close(fd)


class MemoryCheck:
    """The restore's page check: the stored page files prefetched while CRIU runs, then the restored
    memory checked (``result``) before the held tasks are let go."""

    def __init__(self, stored: Path, layout: PageLayout, manifest: dict[str, Any], io_threads: int | None):
        self.stored, self.layout, self.manifest, self.io_threads = stored, layout, manifest, io_threads
        self.seconds = 0.0  # the check in memory (on the restore's path)
        self.prefetch_seconds = 0.0
        self.checked_bytes = 0
        self._stop = threading.Event()
        self._read = anyio.Event()

    async def run(self) -> None:
        """Read the stored page files ahead of CRIU (a failure here only costs speed)."""
        started = time.monotonic()
        paths = [self.stored / p.pages for p in self.layout.processes]
        threads = self.io_threads or default_io_threads()
        try:
            await anyio.to_thread.run_sync(read_ahead, paths, threads, self._stop, abandon_on_cancel=True)
        except OSError as exc:
            log.warning("page prefetch stopped", directory=str(self.stored), error=str(exc))
        finally:
            self.prefetch_seconds = time.monotonic() - started
            self._read.set()

    async def result(self, host_pid: Callable[[int], int | None]) -> None:
        self._stop.set()  # CRIU has read everything
        started = time.monotonic()
        try:
            self.checked_bytes = await anyio.to_thread.run_sync(
                verify_memory, self.stored, self.layout, self.manifest, host_pid, self.io_threads)
        finally:
            self.seconds = time.monotonic() - started

    async def then_prefetch(self, warm: Prefetch) -> None:
        """Start reading a worker's declared files once the page files are read (the disk is theirs then)."""
        await self._read.wait()
        warm.start()


class Verified:
    """The null page check: every byte was verified before CRIU (a complete agent-private copy)."""

    seconds = prefetch_seconds = 0.0
    checked_bytes = 0

    async def run(self) -> None:
        return None

    async def result(self, host_pid: Callable[[int], int | None]) -> None:
        return None

    async def then_prefetch(self, warm: Prefetch) -> None:
        warm.start()
