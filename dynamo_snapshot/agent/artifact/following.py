"""Digests of CRIU's page images computed while CRIU writes them (the checkpoint's dump stage), so the
manifest stage only assembles them: the same manifest, chunk for chunk, as hashing every file after
the dump (``manifest.write_manifest``), without reading many GiB again at the end.

    start     before CRIU runs: a write watch on the staging directory (``host/fswatch.py``) and
              ``threads`` digest readers; None where the kernel gives no watch (the manifest stage
              then hashes every file, as without a follower)
    follow    each write to a ``pages-*.img``: every DIGEST_CHUNK the file has grown past is hashed
              (from the page cache CRIU has just filled) and its writeback started
    writer    CRIU's PID, once it runs
    exited    CRIU exited 0: every write it made is queued by now; each page image's tail is hashed
    finish    the manifest stage: the digests of each page image nothing doubts (``doubt``); the
              others are left to the manifest's own pass
    close     on any failure, and after finish: the watch and the readers stop, nothing is kept

Why the data below a page image's size is final: CRIU creates each pages-<id>.img (O_CREAT|O_TRUNC,
in a fresh staging directory) and splices the pages into it at the file position (criu/page-xfer.c,
``write_pages_loc``), one task after another: it only appends. Only with a parent image (pre-dump
chains, auto-dedup) does CRIU write into page images elsewhere; the checkpoint pipeline makes none.
What is checked rather than assumed, per file: every write to it, and every close of it after writing,
came from CRIU's PID while CRIU ran (nothing else wrote to it, nothing wrote to it after), its size
never went down, its inode stayed, and at the manifest stage it still has the size its tail was hashed
to and nothing holds it open for writing (a store through a shared mapping raises no write event, but
its process opened the file for writing: its close is heard, or its open descriptor seen); an
overflowed watch doubts every file. A doubted file is hashed again by the manifest stage; its early digests are dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dynamo_snapshot.agent.artifact.manifest import DIGEST_CHUNK, Hashed, default_io_threads, sha256_range
from dynamo_snapshot.agent.host import fswatch

log = structlog.get_logger(__name__)

PAGE_IMAGE = re.compile(r"pages-\d+\.img")


@dataclass
class Track:
    """What the watch saw of one page image."""

    name: str
    inode: int
    size: int = 0  # the largest size seen
    queued_to: int = 0  # chunks below this offset are being hashed
    writers: set[int] = field(default_factory=set)
    shrank: bool = False
    replaced: bool = False
    late: bool = False  # written after CRIU exited
    final_size: int | None = None  # the size the tail was hashed to
    during_dump: int = 0  # bytes queued for hashing before CRIU exited


def doubt(track: Track, criu_pid: int | None, size_now: int | None, inode_now: int | None) -> str | None:
    """Why the early digests of ``track`` cannot stand for the file as it is now (None: they can). Pure."""
    foreign = sorted(track.writers - {criu_pid})
    if criu_pid is None or track.final_size is None:
        return "CRIU's run was not followed to its end"
    if foreign:
        return f"written by PIDs {foreign}, not only by CRIU (PID {criu_pid})"
    if track.late:
        return "written after CRIU exited"
    if track.shrank:
        return "its size went down while CRIU wrote it"
    if track.replaced or inode_now != track.inode:
        return "replaced by another file"
    if size_now != track.final_size:
        return f"now {size_now} bytes, its digests cover {track.final_size}"
    return None


def ranges_ready(queued_to: int, size: int, chunk: int, final: bool) -> list[tuple[int, int]]:
    """The (offset, length) chunks of a file of ``size`` bytes that can be hashed beyond ``queued_to``:
    whole chunks only while the file grows, the tail too once it is ``final``. Pure."""
    ends = size if final else size - size % chunk
    out = [(start, min(chunk, size - start)) for start in range(queued_to, ends, chunk)]
    return out or ([(0, 0)] if final and size == 0 and queued_to == 0 else [])


def _digest(path: Path, offset: int, length: int) -> str:
    digest = sha256_range(path, offset, length)
    with contextlib.suppress(OSError):  # only a head start for the manifest's fsync, which reports errors
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fswatch.start_writeback(fd, offset, length)
        finally:
            os.close(fd)
    return digest


class Follower:
    def __init__(self, staging: Path, watch: fswatch.WriteWatch, threads: int, chunk_bytes: int):
        self.staging, self.watch, self.chunk_bytes = staging, watch, chunk_bytes
        self.tracks: dict[str, Track] = {}
        self.futures: dict[str, list[Future[str]]] = {}
        self.criu_pid: int | None = None
        self.exited = self.overflowed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dump-digest")
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._reader = threading.Thread(target=self._loop, name="dump-follower", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, staging: Path, threads: int | None = None, chunk_bytes: int = DIGEST_CHUNK) -> Follower | None:
        try:
            watch = fswatch.WriteWatch.open(staging)
        except fswatch.WatchUnavailable as exc:
            log.info("page images are digested after the dump: no write watch", reason=str(exc))
            return None
        return cls(staging, watch, threads or default_io_threads(), chunk_bytes)

    def writer(self, pid: int) -> None:
        self.criu_pid = pid

    def _loop(self) -> None:
        while True:
            self.watch.wait(3600.0, self._wake_r)
            with self._lock:
                if self._stop:
                    return
                self._drain()

    def _drain(self) -> None:
        """Reads the queued writes (the lock held)."""
        for write in self.watch.read():
            if write.name is None:
                self.overflowed = True
            elif PAGE_IMAGE.fullmatch(write.name):
                self._on_write(write)

    def _on_write(self, write: fswatch.Write) -> None:
        track = self.tracks.get(write.name) or self.tracks.setdefault(write.name, Track(write.name, write.inode))
        track.writers.add(write.pid)
        track.late |= self.exited
        track.replaced |= write.inode != track.inode
        track.shrank |= write.size < track.size
        track.size = max(track.size, write.size)
        if not self.exited:
            self._queue(track, final=False)

    def _queue(self, track: Track, final: bool) -> None:
        path = self.staging / track.name
        for offset, length in ranges_ready(track.queued_to, track.size, self.chunk_bytes, final):
            self.futures.setdefault(track.name, []).append(self._pool.submit(_digest, path, offset, length))
            track.queued_to = offset + length

    def writer_exited(self) -> None:
        """CRIU exited 0: the rest of its writes, then every page image's tail."""
        with self._lock:
            self._drain()
            self.exited = True
            for track in self.tracks.values():
                track.during_dump = track.queued_to
                try:
                    st = os.stat(self.staging / track.name, follow_symlinks=False)
                except FileNotFoundError:
                    track.replaced = True
                    continue
                track.replaced |= st.st_ino != track.inode
                track.shrank |= st.st_size < track.size
                track.size = st.st_size
                self._queue(track, final=True)
                track.final_size = track.size

    def finish(self) -> dict[str, Hashed]:
        """The early digests that stand (blocks until the readers are done; then closes)."""
        try:
            with self._lock:
                self._drain()
                doubts = {name: self._doubt(track) for name, track in self.tracks.items()}
            hashed = {}
            for name, track in self.tracks.items():
                reason = doubts[name]
                try:
                    digests = tuple(f.result() for f in self.futures.get(name, []))
                except Exception as exc:  # any failed read is a doubt: the manifest stage hashes it again
                    reason = reason or f"reading it failed: {exc}"
                if reason is not None:
                    log.warning("a page image is digested again at the manifest stage", file=name, reason=reason)
                    continue
                assert track.final_size is not None
                hashed[name] = Hashed(track.final_size, track.inode, self.chunk_bytes, digests)
            log.info("page images digested during the dump", files=sorted(hashed),
                     during_dump_bytes=sum(self.tracks[n].during_dump for n in hashed),
                     after_bytes=sum(self.tracks[n].final_size - self.tracks[n].during_dump for n in hashed))
            return hashed
        finally:
            self.close()

    def _doubt(self, track: Track) -> str | None:
        if self.overflowed:
            return "the write watch overflowed"
        try:
            st = os.stat(self.staging / track.name, follow_symlinks=False)
        except FileNotFoundError:
            return "removed"
        if fswatch.open_for_writing(self.staging / track.name):
            return "open for writing by another process (or no lease can tell)"
        return doubt(track, self.criu_pid, st.st_size, st.st_ino)

    def close(self) -> None:
        """Stops the watch and the readers (idempotent): queued digests are dropped, none is kept."""
        with self._lock:
            if self._stop:
                return
            self._stop = True
        os.write(self._wake_w, b"x")
        self._reader.join()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.watch.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
