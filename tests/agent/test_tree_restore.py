"""Checkpoint and restore of a plain process tree (agent/tree.py) with CRIU, no GPU: the restore
starts CRIU before the raw page data is verified and checks it in the restored memory, so a corrupted
page - on storage before the restore, or rewritten while CRIU reads it - must still stop the restored
process before it runs a single instruction."""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.errors import ArtifactInvalid
from dynamo_snapshot.agent.pipeline.hooks import Hooks

# Counts up in a file every 10 ms, with 96 MiB of its own memory (a page image above one digest chunk).
# The count is rewritten in place through one descriptor, at a fixed width: whenever the dump comes,
# the file it records is there at restore with the size it had (a temporary renamed over the count
# would be gone by then, and CRIU refuses an open file it cannot find).
TICKER = """
import os, sys, time
heap = bytearray(os.urandom(96 << 20))
out = sys.argv[1]
fd = os.open(out + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
n = 0
while True:
    n += 1
    os.pwrite(fd, str(n).ljust(20).encode(), 0)
    if n == 1:
        os.rename(out + ".new", out)  # readers never see it empty
    time.sleep(0.01)
"""


# The ticker with a family: a child process with memory of its own and a thread in each, so the check
# in memory maps several processes and meets every thread's rseq area.
FAMILY = TICKER.replace("heap = bytearray(os.urandom(96 << 20))", """heap = bytearray(os.urandom(96 << 20))
import threading
threading.Thread(target=lambda: time.sleep(1e6), daemon=True).start()
if os.fork() == 0:
    mine = bytearray(os.urandom(8 << 20))
    threading.Thread(target=lambda: time.sleep(1e6), daemon=True).start()
    while True:
        time.sleep(1)""")


@pytest.fixture
def bundle() -> criu.CriuBundle:
    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU)")
    try:
        return criu.CriuBundle.locate()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def counting(path: Path, within: float = 10.0) -> bool:
    """Whether the ticker writes new values (waiting up to ``within`` seconds: a restored process on a
    loaded machine may take a moment to be scheduled). A restored ticker starts over from its count at
    the dump, below what the original wrote after it, so "new" is "different", twice."""
    deadline = time.monotonic() + within
    seen = {int(path.read_text())}
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        seen.add(int(path.read_text()))
    return len(seen) >= 3


def start_ticker(tmp_path: Path, script: str = TICKER) -> tuple[subprocess.Popen, Path]:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: restored trees come back to us
    count = tmp_path / "count"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(count)], start_new_session=True, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while not count.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, count


def gone(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.01)


def test_tree_roundtrip_with_overlapped_verification(bundle: criu.CriuBundle, tmp_path: Path) -> None:
    proc, count = start_ticker(tmp_path)
    settings = criu.CriuSettings(network_lock="skip")
    stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "t1", bundle, settings=settings))
    assert any("chunkSha256" in f for f in stored.manifest["files"])
    gone(proc.pid)
    restored = anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "t1", bundle, settings=settings, io_threads=4))
    try:
        assert restored.pid == proc.pid
        assert "prefetch-pages" in restored.seconds
        assert counting(count)  # released from the stop and counting again
    finally:
        gone(restored.pid)


def test_a_corrupted_page_kills_the_restored_tree_before_it_runs(bundle: criu.CriuBundle, tmp_path: Path) -> None:
    proc, count = start_ticker(tmp_path)
    settings = criu.CriuSettings(network_lock="skip")
    stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "t2", bundle, settings=settings))
    gone(proc.pid)
    pages = next(stored.directory / f["path"] for f in stored.manifest["files"] if f["path"].startswith("pages-"))
    size = pages.stat().st_size
    with open(pages, "r+b") as f:  # flip a byte in the last chunk: CRIU has long started by then
        f.seek(size - 100)
        byte = f.read(1)
        f.seek(size - 100)
        f.write(bytes([byte[0] ^ 0x01]))
    last = count.read_text()
    restored_memory = r"pages-\d+\.img bytes \d+-\d+ as restored in process \d+'s memory have SHA-256"
    with pytest.raises(ArtifactInvalid, match=restored_memory):
        anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "t2", bundle, settings=settings, io_threads=4))
    time.sleep(0.2)
    assert count.read_text() == last  # the restored copy never ran
    assert not Path(f"/proc/{proc.pid}").exists() or "Z" in Path(f"/proc/{proc.pid}/stat").read_text().split()[2]


class RewriteWhileCriuReads(Hooks):
    """The attacker's move against a check on storage: as CRIU is about to start, wait until the first
    chunk of the page file has been read from storage by whoever reads it first (its pages are in the
    page cache; they were dropped before the restore), then rewrite a byte at its start: a check on
    storage has passed it, CRIU reads the new one."""

    def __init__(self, pages: Path):
        self.pages, self.rewritten = pages, False

    async def on_stage(self, stage: enum.StrEnum) -> None:
        if stage.value != "criu":
            return
        with anyio.fail_after(30):
            while not resident(self.pages, 64 << 20):  # noqa: ASYNC110 - the page cache has no event to wait on
                await anyio.sleep(0.005)
        flip(self.pages, 4096 * 3 + 17)
        self.rewritten = True


def resident(path: Path, length: int) -> bool:
    """Whether the first ``length`` bytes of ``path`` are all in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    length = min(length, path.stat().st_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        pages = (length + 4095) // 4096
        vec = (ctypes.c_ubyte * pages)()
        try:
            libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec)
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(length))
    finally:
        os.close(fd)
    return all(v & 1 for v in vec)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))


def gone_family(pid: int) -> None:
    """The tree's process group killed (the child outlives its parent otherwise), and reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    gone(pid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.01)
        except ChildProcessError:
            return


def test_a_family_restores_and_a_page_rewritten_while_criu_reads_it_never_runs(
    bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    proc, count = start_ticker(tmp_path, FAMILY)
    settings = criu.CriuSettings(network_lock="skip")
    stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "fam", bundle, settings=settings))
    assert len(list(stored.directory.glob("pagemap-*.img"))) == 2
    gone_family(proc.pid)
    restored = anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "fam", bundle, settings=settings, io_threads=4))
    try:
        assert restored.seconds["verify-memory"] > 0  # both processes, every thread's rseq area left out
        assert counting(count)
    finally:
        gone_family(restored.pid)

    pages = max(stored.directory.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    rewrite = RewriteWhileCriuReads(pages)
    drop_from_page_cache(pages)
    assert not resident(pages, 64 << 20)
    last = count.read_text()
    with pytest.raises(ArtifactInvalid, match=rf"{pages.name} bytes 0-\d+ as restored in process \d+'s memory"):
        anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "fam", bundle, settings=settings, io_threads=4,
                                            hooks=rewrite))
    assert rewrite.rewritten
    time.sleep(0.2)
    assert count.read_text() == last  # the restored copy never ran
