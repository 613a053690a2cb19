"""Checkpoint and restore of a plain process tree (agent/tree.py) with CRIU, no GPU: the restore
overlaps CRIU with the verification of the raw page data, so a corrupted page must still stop the
restored process before it runs a single instruction."""

from __future__ import annotations

import ctypes
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


def start_ticker(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: restored trees come back to us
    count = tmp_path / "count"
    proc = subprocess.Popen(
        [sys.executable, "-c", TICKER, str(count)], start_new_session=True, stdin=subprocess.DEVNULL
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
        assert "verify-pages" in restored.seconds
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
    with pytest.raises(ArtifactInvalid, match=r"pages-\d+\.img has SHA-256 \w+ in bytes"):
        anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "t2", bundle, settings=settings, io_threads=4))
    time.sleep(0.2)
    assert count.read_text() == last  # the restored copy never ran
    assert not Path(f"/proc/{proc.pid}").exists() or "Z" in Path(f"/proc/{proc.pid}/stat").read_text().split()[2]
