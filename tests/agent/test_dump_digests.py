"""What the checkpoint pipeline overlaps, with real CRIU on a process tree. The page images' digests
computed while CRIU writes them (artifact/following.py): the manifest is the one hashing after the
dump gives, a page image written behind the follower is hashed again, a CRIU that fails mid-dump leaves
nothing promoted. A tree's GPU state comes back while its checkpoint is kept, and a failure there waits
for it before undoing."""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.artifact import following
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda.step import NoCuda
from dynamo_snapshot.agent.errors import CriuFailed
from dynamo_snapshot.agent.host import fswatch
from dynamo_snapshot.agent.pipeline.checkpoint import Stage
from dynamo_snapshot.agent.pipeline.hooks import Hooks
from tests.agent import test_tree_restore as trees
from tests.agent.test_tree_restore import TICKER, counting, gone, start_ticker

bundle = trees.bundle  # the fixture: root and a CRIU bundle, else skipped

SETTINGS = criu.CriuSettings(network_lock="skip")
BIG_TICKER = TICKER.replace("os.urandom(96 << 20)", "os.urandom(300 << 20)")  # a page image of ~5 digest chunks
assert BIG_TICKER != TICKER


def page_image(directory: Path) -> Path:
    return max(directory.glob("pages-*.img"), key=lambda p: p.stat().st_size)


def test_digests_taken_during_the_dump_are_those_of_hashing_every_file_after_it(
    bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    proc, _ = start_ticker(tmp_path, BIG_TICKER)
    try:
        stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "d1", bundle, settings=SETTINGS))
    finally:
        gone(proc.pid)
    pages = page_image(stored.directory)
    assert pages.name in stored.digested_during_dump
    assert pages.stat().st_size > 4 * artifact.DIGEST_CHUNK
    full_pass = {f["path"]: f for f in artifact.digest_files(stored.directory, io_threads=2)}
    assert stored.manifest["files"] == [full_pass[f["path"]] for f in stored.manifest["files"]]


# Changes byte 10 of a file through a shared mapping (no write system call, so no write event) and keeps
# the file open, as a process scribbling on it from the side would.
SCRIBBLER = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[10] ^= 0x01
m.flush()
print("changed", flush=True)
time.sleep(600)
"""


class ScribbleAtManifest(Hooks):
    def __init__(self, base: Path):
        self.base = base
        self.scribbler: subprocess.Popen | None = None
        self.changed: Path | None = None

    async def on_stage(self, stage: enum.StrEnum) -> None:
        if stage != Stage.MANIFEST:
            return
        await anyio.to_thread.run_sync(self.scribble)

    def scribble(self) -> None:
        pages = page_image(next((self.base / "d7" / "versions" / "tmp").iterdir()))
        self.scribbler = subprocess.Popen([sys.executable, "-c", SCRIBBLER, str(pages)], stdout=subprocess.PIPE)
        assert self.scribbler.stdout is not None and self.scribbler.stdout.readline() == b"changed\n"
        self.changed = pages


def test_a_page_image_changed_through_a_mapping_behind_the_follower_is_hashed_again(
    bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    proc, _ = start_ticker(tmp_path, BIG_TICKER)
    hooks = ScribbleAtManifest(tmp_path / "ck")
    try:
        stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "d7", bundle, settings=SETTINGS,
                                                        hooks=hooks))
    finally:
        gone(proc.pid)
        if hooks.scribbler is not None:
            hooks.scribbler.kill()
            hooks.scribbler.wait()
    assert hooks.changed is not None
    name = hooks.changed.name
    assert name not in stored.digested_during_dump
    entry = next(f for f in stored.manifest["files"] if f["path"] == name)
    assert entry["chunkSha256"][0] == artifact.sha256_range(stored.directory / name, 0, artifact.DIGEST_CHUNK)


def test_without_a_write_watch_every_file_is_hashed_after_the_dump(
    bundle: criu.CriuBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(directory: Path) -> None:
        raise fswatch.WatchUnavailable(1, "fanotify_init: Operation not permitted (needs CAP_SYS_ADMIN)")

    monkeypatch.setattr(fswatch.WriteWatch, "open", staticmethod(refused))
    proc, _ = start_ticker(tmp_path)
    try:
        stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "d6", bundle, settings=SETTINGS))
    finally:
        gone(proc.pid)
    assert stored.digested_during_dump == ()
    full_pass = {f["path"]: f for f in artifact.digest_files(stored.directory, io_threads=2)}
    assert stored.manifest["files"] == [full_pass[f["path"]] for f in stored.manifest["files"]]


class TamperAtManifest(Hooks):
    """Flips a byte of the largest page image in staging once the manifest stage starts (CRIU has exited
    and the follower has hashed the whole file by then)."""

    def __init__(self, base: Path):
        self.base = base
        self.tampered: Path | None = None

    async def on_stage(self, stage: enum.StrEnum) -> None:
        if stage != Stage.MANIFEST:
            return
        pages = page_image(next((self.base / "d2" / "versions" / "tmp").iterdir()))
        fd = os.open(pages, os.O_RDWR)
        try:
            byte = os.pread(fd, 1, 10)
            os.pwrite(fd, bytes([byte[0] ^ 0x01]), 10)
        finally:
            os.close(fd)
        self.tampered = pages


def test_a_page_image_written_behind_the_follower_is_hashed_again(bundle: criu.CriuBundle, tmp_path: Path) -> None:
    proc, _ = start_ticker(tmp_path, BIG_TICKER)
    hooks = TamperAtManifest(tmp_path / "ck")
    try:
        stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "d2", bundle, settings=SETTINGS,
                                                        hooks=hooks))
    finally:
        gone(proc.pid)
    assert hooks.tampered is not None
    name = hooks.tampered.name
    assert name not in stored.digested_during_dump
    entry = next(f for f in stored.manifest["files"] if f["path"] == name)
    # the manifest holds the file as it is, not the digests of what CRIU wrote
    assert entry["chunkSha256"][0] == artifact.sha256_range(stored.directory / name, 0, artifact.DIGEST_CHUNK)


def test_a_criu_that_fails_mid_dump_leaves_nothing_promoted(bundle: criu.CriuBundle, tmp_path: Path) -> None:
    base = tmp_path / "small"
    base.mkdir()
    # room for about two digest chunks of the page image: CRIU fails writing it, the follower has begun
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(base)], check=True)
    proc, count = start_ticker(tmp_path, BIG_TICKER)
    try:
        with pytest.raises(CriuFailed):
            anyio.run(lambda: tree.checkpoint_tree(proc.pid, base, "d3", bundle, settings=SETTINGS))
        versions = base / "d3" / "versions"
        assert [p.name for p in versions.iterdir() if p.name != "tmp"] == []
        assert not (versions / "tmp").exists() or list((versions / "tmp").iterdir()) == []  # staging discarded
        assert not [t for t in threading.enumerate() if t.name == "dump-follower"]
        assert counting(count)  # CRIU resumed the tree
    finally:
        gone(proc.pid)
        subprocess.run(["umount", "-l", str(base)], check=False)


class Events(list):
    """What happened, in order; ``confirmed`` is set by the confirmation (made in the event loop)."""

    def confirmed(self) -> anyio.Event:
        if not hasattr(self, "_confirmed"):
            self._confirmed = anyio.Event()
        return self._confirmed


class RecordingCuda(NoCuda):
    def __init__(self, events: Events):
        self.events = events

    async def release(self) -> None:
        self.events.append("gpu back: start")
        await self.events.confirmed().wait()  # a GPU restore still running at the confirmation: no deadlock
        self.events.append("gpu back: done")

    async def abort(self) -> None:
        self.events.append("abort")


class RecordingConfirm(Hooks):
    def __init__(self, events: Events, fail: bool = False):
        self.events, self.fail = events, fail

    async def confirm(self, directory: Path) -> None:
        self.events.append("confirm")
        self.events.confirmed().set()
        if self.fail:
            raise RuntimeError("the Job could not be annotated")


def test_a_tree_gets_its_gpu_state_back_while_its_checkpoint_is_kept(bundle: criu.CriuBundle, tmp_path: Path) -> None:
    proc, _ = start_ticker(tmp_path)
    events = Events()
    try:
        stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "d4", bundle, RecordingCuda(events),
                                                        settings=SETTINGS, hooks=RecordingConfirm(events)))
    finally:
        gone(proc.pid)
    assert events == ["gpu back: start", "confirm", "gpu back: done"]
    assert "release-gpu-early" in stored.seconds


def test_a_failed_confirmation_waits_for_the_gpu_state_and_withdraws_the_checkpoint(
    bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    proc, _ = start_ticker(tmp_path)
    events = Events()
    try:
        with pytest.raises(RuntimeError, match="could not be annotated"):
            anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "d5", bundle, RecordingCuda(events),
                                                   settings=SETTINGS, hooks=RecordingConfirm(events, fail=True)))
    finally:
        gone(proc.pid)
    assert events == ["gpu back: start", "confirm", "gpu back: done", "abort"]
    assert [p.name for p in (tmp_path / "ck" / "d5" / "versions").iterdir() if p.name != "tmp"] == []


def test_a_follower_doubts_a_file_anything_but_crius_run_touched() -> None:
    def track(**changes: object) -> following.Track:
        t = following.Track("pages-1.img", inode=7, size=100, queued_to=100, writers={42}, final_size=100)
        for key, value in changes.items():
            setattr(t, key, value)
        return t

    assert following.doubt(track(), 42, 100, 7) is None
    assert "PIDs [43]" in following.doubt(track(writers={42, 43}), 42, 100, 7)
    assert "after CRIU exited" in following.doubt(track(late=True), 42, 100, 7)
    assert "went down" in following.doubt(track(shrank=True), 42, 100, 7)
    assert "replaced" in following.doubt(track(), 42, 100, 8)
    assert "now 120 bytes" in following.doubt(track(), 42, 120, 7)
    assert "not followed" in following.doubt(track(final_size=None), 42, 100, 7)


def test_only_whole_chunks_are_hashed_while_a_file_grows_and_the_tail_once_it_is_final() -> None:
    assert following.ranges_ready(0, 250, 100, final=False) == [(0, 100), (100, 100)]
    assert following.ranges_ready(200, 250, 100, final=False) == []
    assert following.ranges_ready(200, 250, 100, final=True) == [(200, 50)]
    assert following.ranges_ready(0, 0, 100, final=True) == [(0, 0)]
    assert following.ranges_ready(300, 300, 100, final=True) == []
