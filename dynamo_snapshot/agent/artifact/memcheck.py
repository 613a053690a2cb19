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

import bisect
import ctypes
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
MAX_CHECK_THREADS = 64

log = structlog.get_logger(__name__)


def _pieces(process: ProcessPages, start: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(file offset, address, length) runs of ``[start, start + length)`` of the process's page file."""
    end = start + length
    i = max(0, bisect.bisect_right(process.offsets, start) - 1)
    while i < len(process.spans) and process.offsets[i] < end:
        offset, span = process.offsets[i], process.spans[i]
        lo, hi = max(start, offset), min(end, offset + span.length)
        if lo < hi:
            yield lo, span.vaddr + lo - offset, hi - lo
        i += 1


def _split(address: int, length: int, kernel: tuple[tuple[int, int], ...]) -> Iterator[tuple[int, int, bool]]:
    """(address, length, from memory?) runs of one piece, the kernel's ranges cut out."""
    end = address + length
    i = max(0, bisect.bisect_right(kernel, (address, address)) - 1)
    for lo, hi in kernel[i:]:
        if lo >= end:
            break
        if hi <= address:
            continue
        if lo > address:
            yield address, lo - address, True
        cut = min(hi, end)
        yield max(address, lo), cut - max(address, lo), False
        address = cut
    if address < end:
        yield address, end - address, True


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec),
                                   ctypes.c_ulong, ctypes.c_ulong]


class _Reader:
    """One thread's reads into a reused buffer, each run fed to the hash as it comes. Memory is read with
    ``process_vm_readv`` (one lock of the address space per 4 MiB, where ``/proc/<pid>/mem`` takes it
    per page: parallel readers of one process scale), and through ``/proc/<pid>/mem`` where that cannot
    read (pages the process may not read itself, e.g. PROT_NONE)."""

    def __init__(self) -> None:
        self.buf = bytearray(_READ)
        self.view = memoryview(self.buf)
        self.local = _IOVec(ctypes.addressof(ctypes.c_char.from_buffer(self.buf)), _READ)

    def feed(self, h: Any, fd: int, offset: int, length: int, what: Callable[[], str]) -> None:
        done = 0
        while done < length:
            n = self._pread(fd, min(_READ, length - done), offset + done, what)
            h.update(self.view[:n])
            done += n

    def gather(self, h: Any, pid: int, mem_fd: int, runs: list[tuple[int, int]], what: Callable[[int], str]) -> None:
        """Hash the memory ``runs`` ((address, length), together at most the buffer, at most IOV_MAX of
        them) in order: one ``process_vm_readv``; from where it stopped short, ``/proc/<pid>/mem``."""
        while runs:
            remote = (_IOVec * len(runs))(*(_IOVec(a, n) for a, n in runs))
            self.local.len = total = sum(n for _, n in runs)
            got = _libc.process_vm_readv(pid, ctypes.byref(self.local), 1, remote, len(runs), 0)
            got = max(got, 0)
            h.update(self.view[:got])
            if got == total:
                return
            for k, (address, n) in enumerate(runs):  # the run it stopped in: the forced read, then the rest
                if got < n:
                    self.feed(h, mem_fd, address + got, n - got, lambda address=address: what(address))
                    runs = runs[k + 1:]
                    break
                got -= n

    def _pread(self, fd: int, want: int, offset: int, what: Callable[[], str]) -> int:
        try:
            n = os.preadv(fd, [self.view[:want]], offset)
        except OSError as exc:
            raise ArtifactInvalid(f"{what()} could not be read ({exc.strerror})") from None
        if n <= 0:
            raise ArtifactInvalid(f"{what()} ends {want} bytes short")
        return n


_readers = threading.local()


def _reader() -> _Reader:
    reader = getattr(_readers, "reader", None)
    if reader is None:
        reader = _readers.reader = _Reader()
    return reader


_IOV_MAX = 1024


def chunk_digest(process: ProcessPages, pid: int, mem_fd: int, stored_fd: int, start: int, length: int) -> str:
    """SHA-256 of bytes ``[start, start + length)`` of the process's page file, as restored in memory
    (``pid``: the restored process, ``mem_fd`` its ``/proc/<pid>/mem``). Memory runs are read in
    batches (a fragmented heap is many short runs)."""
    reader = _reader()
    h = hashlib.sha256()
    batch: list[tuple[int, int]] = []
    batched = 0

    def what(address: int) -> str:
        return f"restored memory of process {process.pid} at {address:#x}"

    def flush() -> None:
        nonlocal batch, batched
        if batch:
            reader.gather(h, pid, mem_fd, batch, what)
        batch, batched = [], 0

    for offset, address, n in _pieces(process, start, length):
        for at, size, in_memory in _split(address, n, process.kernel):
            if not in_memory:
                flush()
                reader.feed(h, stored_fd, offset + at - address, size, lambda: f"stored {process.pages}")
                continue
            while size:
                take = min(size, _READ - batched)
                batch.append((at, take))
                batched += take
                at, size = at + take, size - take
                if batched == _READ or len(batch) == _IOV_MAX:
                    flush()
    flush()
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
            reader = _reader()
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
    jobs: list[tuple[ProcessPages, int, int, int, int, int, str]] = []
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
            jobs += [(process, pid, mem, src, start, n, digest) for start, n, digest in expected if n]

        def check(job: tuple[ProcessPages, int, int, int, int, int, str]) -> None:
            process, pid, mem, src, start, n, want = job
            got = chunk_digest(process, pid, mem, src, start, n)
            if got != want:
                raise ArtifactInvalid(
                    f"{stored / process.pages} bytes {start}-{start + n} as restored in process {process.pid}'s "
                    f"memory have SHA-256 {got}; the manifest says {want} (the page data changed on storage, "
                    f"or CRIU restored something else); refused before the restored tasks ran")

        # CPU-bound (SHA-256 of memory) while nothing else runs: every CPU, not only the I/O readers
        workers = max(io_threads or 1, min(MAX_CHECK_THREADS, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memcheck") as pool:
            list(pool.map(check, jobs))
        return sum(job[5] for job in jobs)
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
