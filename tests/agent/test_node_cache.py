"""The node-local checkpoint cache keeps complete, verified copies of versions bound to their authenticated
manifest, within a byte budget: a tampered, truncated or swapped source is refused and nothing is cached,
least recently used entries go first but never one a restore is reading, and a failed or interrupted fill
leaves nothing that is ever used."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact import authn, copies
from dynamo_snapshot.agent.artifact.cachefiles import RECORD
from dynamo_snapshot.agent.artifact.nodecache import NodeCache, NodeCacheError, NodeCacheFull
from dynamo_snapshot.agent.errors import ArtifactInvalid

KiB = 1024


def stored_version(tmp_path: Path, name: str, files: dict[str, bytes]) -> tuple[Path, dict]:
    """A version directory as a checkpoint leaves it, and its manifest as a restore authenticated it."""
    version = tmp_path / "storage" / name / "versions" / "1"
    version.mkdir(parents=True)
    entries = []
    for rel, data in files.items():
        (version / rel).write_bytes(data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    data = json.dumps({"checkpointID": name, "files": entries}).encode()
    (version / authn.MANIFEST).write_bytes(data)
    (version / authn.MAC_FILE).write_text("hmac-sha256 k1 " + "0" * 64 + "\n")
    manifest = authn.AuthenticatedManifest(json.loads(data))
    manifest.sha256 = hashlib.sha256(data).hexdigest()
    return version, manifest


def sized(name: str, kib: int) -> tuple[str, dict[str, bytes]]:
    return name, {"core-1.img": name.encode() * 8, "pages-1.img": os.urandom(kib * KiB)}


def test_a_filled_version_is_a_hit_with_every_file_of_the_version(tmp_path: Path) -> None:
    version, manifest = stored_version(tmp_path, "ck", {"core-1.img": b"core", "pages-1.img": b"p" * 5000})
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    filled = cache.fill("ck", "1", version, manifest)
    assert filled is not None and filled.bytes > 5000
    with cache.use("ck", "1", manifest) as entry:
        assert entry is not None
        assert entry.path == tmp_path / "cache" / "ck" / "1"
        assert (entry.path / "pages-1.img").read_bytes() == b"p" * 5000
        assert not (entry.path / "pages-1.img").is_symlink()
        assert (entry.path / authn.MANIFEST).read_bytes() == (version / authn.MANIFEST).read_bytes()
        assert (entry.path / authn.MAC_FILE).exists() and (entry.path / RECORD).exists()
        assert [e.pins for e in cache.entries()] == [1]
    assert [(e.checkpoint_id, e.version, e.pins) for e in cache.entries()] == [("ck", "1", 0)]
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == "0o700"
    assert cache.fill("ck", "1", version, manifest) is None  # cached already


def test_a_tampered_source_file_is_refused_by_name_and_nothing_is_cached(tmp_path: Path) -> None:
    version, manifest = stored_version(tmp_path, "ck", {"core-1.img": b"core", "pages-1.img": b"p" * 5000})
    (version / "pages-1.img").write_bytes(b"q" * 5000)
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    with pytest.raises(ArtifactInvalid, match=str(version / "pages-1.img")):
        cache.fill("ck", "1", version, manifest)
    assert cache.entries() == [] and cache.used_bytes == 0
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == [".partial"]


@pytest.mark.parametrize("attack", ["truncated", "symlink", "fifo"])
def test_a_source_that_is_not_a_regular_file_of_the_listed_size_is_refused(tmp_path: Path, attack: str) -> None:
    version, manifest = stored_version(tmp_path, "ck", {"core-1.img": b"core", "pages-1.img": b"p" * 5000})
    target = version / "pages-1.img"
    target.unlink()
    if attack == "truncated":
        target.write_bytes(b"p" * 4000)
    elif attack == "symlink":
        (tmp_path / "elsewhere").write_bytes(b"p" * 5000)
        target.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(target)
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    with pytest.raises(ArtifactInvalid, match=str(target)):
        cache.fill("ck", "1", version, manifest)
    assert cache.entries() == []
    assert list((tmp_path / "cache" / ".partial").iterdir()) == []


def test_the_least_recently_used_entry_is_evicted_first(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", 250 * KiB)
    stored = {name: stored_version(tmp_path, *sized(name, 100)) for name in ("a", "b", "c")}
    cache.fill("a", "1", *stored["a"])
    cache.fill("b", "1", *stored["b"])
    with cache.use("a", "1", stored["a"][1]):  # a is used after b: b is the least recently used
        pass
    cache.fill("c", "1", *stored["c"])
    assert [e.checkpoint_id for e in cache.entries()] == ["a", "c"]
    assert not (tmp_path / "cache" / "b").exists()
    assert cache.used_bytes <= 250 * KiB


def test_an_entry_pinned_by_a_running_restore_is_not_evicted(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", 250 * KiB)
    stored = {name: stored_version(tmp_path, *sized(name, 100)) for name in ("a", "b", "c")}
    cache.fill("a", "1", *stored["a"])
    cache.fill("b", "1", *stored["b"])
    with cache.use("a", "1", stored["a"][1]) as reading, cache.use("b", "1", stored["b"][1]):
        with pytest.raises(NodeCacheFull, match="pinned by running restores: a/1, b/1"):
            cache.fill("c", "1", *stored["c"])
        assert reading is not None and (reading.path / "pages-1.img").exists()
    with cache.use("b", "1", stored["b"][1]):  # now a is the least recently used, and free
        cache.fill("c", "1", *stored["c"])
    assert [e.checkpoint_id for e in cache.entries()] == ["b", "c"]


def test_a_fill_bigger_than_the_budget_fails_and_leaves_nothing(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", 50 * KiB)
    small = stored_version(tmp_path, *sized("small", 10))
    cache.fill("small", "1", *small)
    with pytest.raises(NodeCacheFull, match=r"big version 1 is \d+ bytes, more than the whole budget of 51200"):
        cache.fill("big", "1", *stored_version(tmp_path, *sized("big", 100)))
    assert [e.checkpoint_id for e in cache.entries()] == ["small"]  # nothing evicted for a fill that cannot fit
    assert not (tmp_path / "cache" / "big").exists()
    assert list((tmp_path / "cache" / ".partial").iterdir()) == []


def test_a_start_sweeps_partial_fills_and_entries_without_a_completion_record(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    version, manifest = stored_version(tmp_path, *sized("kept", 10))
    cache.fill("kept", "1", version, manifest)
    cache.close()
    (tmp_path / "cache" / ".partial" / "left-by-a-killed-agent").mkdir()
    (tmp_path / "cache" / ".partial" / "left-by-a-killed-agent" / "pages-1.img").write_bytes(b"x")
    (tmp_path / "cache" / "half" / "1").mkdir(parents=True)
    (tmp_path / "cache" / "half" / "1" / "pages-1.img").write_bytes(b"x")
    (tmp_path / "cache" / "kept" / "2").mkdir()
    (tmp_path / "cache" / "kept" / "2" / RECORD).write_text("{not json")
    again = NodeCache(tmp_path / "cache", 1 << 20)
    assert [(e.checkpoint_id, e.version) for e in again.entries()] == [("kept", "1")]
    assert sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").iterdir()) == [
        ".partial", "kept"]
    assert list((tmp_path / "cache" / ".partial").iterdir()) == []
    assert not (tmp_path / "cache" / "kept" / "2").exists()
    with again.use("kept", "1", manifest) as entry:
        assert entry is not None


def test_an_entry_of_another_manifest_is_a_miss(tmp_path: Path) -> None:
    version, manifest = stored_version(tmp_path, *sized("ck", 10))
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    cache.fill("ck", "1", version, manifest)
    other = authn.AuthenticatedManifest(manifest)
    other.sha256 = hashlib.sha256(b"another manifest").hexdigest()
    with cache.use("ck", "1", other) as entry:
        assert entry is None
    with cache.use("ck", "1", dict(manifest)) as entry:  # not authenticated: never bound
        assert entry is None
    with cache.use("ck", "1", manifest) as entry:
        assert entry is not None


def test_a_dropped_checkpoint_goes_at_once_or_when_its_restore_ends(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    stored = {name: stored_version(tmp_path, *sized(name, 10)) for name in ("a", "b")}
    cache.fill("a", "1", *stored["a"])
    cache.fill("b", "1", *stored["b"])
    with cache.use("a", "1", stored["a"][1]) as reading:
        assert cache.drop("a") == 1 and cache.drop("b") == 1
        assert not (tmp_path / "cache" / "b").exists()
        assert reading is not None and (reading.path / "pages-1.img").exists()  # still being read
        with cache.use("a", "1", stored["a"][1]) as again:
            assert again is None  # dropped: not used by anyone new
    assert not (tmp_path / "cache" / "a").exists()
    assert cache.entries() == [] and cache.used_bytes == 0


def test_fills_in_threads_keep_the_budget_and_never_take_an_entry_a_restore_reads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cache = NodeCache(tmp_path / "cache", 350 * KiB)
    stored = {name: stored_version(tmp_path, *sized(name, 100)) for name in "abcdefgh"}
    cache.fill("a", "1", *stored["a"])
    expected = (stored["a"][0] / "pages-1.img").read_bytes()

    def fill(name: str) -> str:
        try:
            cache.fill(name, "1", *stored[name])
            return "filled"
        except NodeCacheFull:  # the others' reservations left no room at that moment
            return "full"

    with cache.use("a", "1", stored["a"][1]) as reading, ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(fill, "bcdefgh"))
        assert reading is not None and (reading.path / "pages-1.img").read_bytes() == expected
    assert "filled" in outcomes
    assert "a" in [e.checkpoint_id for e in cache.entries()]
    assert cache.used_bytes == sum(e.bytes for e in cache.entries()) <= 350 * KiB
    on_disk = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != ".partial")
    assert on_disk == sorted(e.checkpoint_id for e in cache.entries())
    assert list((tmp_path / "cache" / ".partial").iterdir()) == []


def test_a_version_dropped_while_read_is_filled_again_only_after_its_restore(tmp_path: Path) -> None:
    version, manifest = stored_version(tmp_path, *sized("ck", 10))
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    cache.fill("ck", "1", version, manifest)
    with cache.use("ck", "1", manifest):
        cache.drop("ck")
        with pytest.raises(NodeCacheError, match="dropped while a restore reads it"):
            cache.fill("ck", "1", version, manifest)
    assert cache.fill("ck", "1", version, manifest) is not None
    with cache.use("ck", "1", manifest) as entry:
        assert entry is not None


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 64 KiB tmpfs (root only), or None."""
    if os.geteuid() != 0:
        yield None
        return
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_cache_disk_leaves_nothing_half_written(tmp_path: Path, tiny_disk: Path | None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    version, manifest = stored_version(tmp_path, *sized("ck", 200))
    root = (tiny_disk or tmp_path) / "cache"
    cache = NodeCache(root, 1 << 20)  # the budget allows it; the disk does not
    if tiny_disk is None:
        def full(*args: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(copies.os, "sendfile", full)
    with pytest.raises(NodeCacheError, match=r"filling ck version 1 failed \(the cache disk is full\)"):
        cache.fill("ck", "1", version, manifest)
    assert cache.entries() == [] and cache.used_bytes == 0
    assert sorted(p.name for p in root.rglob("*")) == [".partial"]
    monkeypatch.undo()
    small, small_manifest = stored_version(tmp_path, *sized("small", 8))
    assert cache.fill("small", "1", small, small_manifest) is not None  # the space came back


def test_a_failure_writing_the_completion_record_leaves_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    version, manifest = stored_version(tmp_path, *sized("ck", 10))
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    real = os.fsync
    calls = {"n": 0}

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/" + RECORD):
            calls["n"] += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(NodeCacheError, match="nothing was cached"):
        cache.fill("ck", "1", version, manifest)
    assert calls["n"] == 1
    monkeypatch.undo()
    assert cache.entries() == []
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == [".partial"]
    assert [(e.checkpoint_id, e.version) for e in NodeCache(tmp_path / "cache", 1 << 20).entries()] == []


def test_a_background_fill_that_fails_only_logs(tmp_path: Path) -> None:
    version, manifest = stored_version(tmp_path, *sized("ck", 10))
    (version / "core-1.img").write_bytes(b"altered")
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    future = cache.fill_in_background("ck", "1", version, manifest)
    assert future is not None and future.result() is None
    cache.settle()
    assert cache.entries() == []


@pytest.fixture
def criu_bundle():
    from dynamo_snapshot.agent.container import criu

    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU)")
    try:
        return criu.CriuBundle.locate()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_a_second_restore_reads_the_cached_copy_and_storage_tampered_after_caching_changes_nothing(
    criu_bundle, tmp_path: Path
) -> None:
    import anyio

    from dynamo_snapshot.agent import tree
    from dynamo_snapshot.agent.container import criu
    from dynamo_snapshot.agent.pipeline import restore as rst
    from dynamo_snapshot.agent.pipeline.trees import TreeRestoreTarget
    from tests.agent import test_tree_restore as ticker

    proc, count = ticker.start_ticker(tmp_path)
    settings = criu.CriuSettings(network_lock="skip")
    base = tmp_path / "ck"
    stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, base, "cached", criu_bundle, settings=settings))
    ticker.gone(proc.pid)
    cache = NodeCache(tmp_path / "cache", 1 << 30, io_threads=4)

    def restore(with_cache: NodeCache | None) -> rst.RestoreResult:
        request = rst.RestoreRequest("cached", base, io_threads=4, prefetch_threads=0, cache=with_cache,
                                     private_root=tmp_path / "private")
        return anyio.run(lambda: rst.restore(TreeRestoreTarget(), request, criu_bundle, settings=settings))

    first = restore(cache)  # a miss: from storage, then the cache is filled in the background
    try:
        assert first.background_seconds["prefetch-pages"] > 0
        assert ticker.counting(count)
    finally:
        ticker.gone(first.host_pid)
    cache.settle()
    assert [(e.checkpoint_id, e.version, e.pins) for e in cache.entries()] == [("cached", "1", 0)]

    pages = next(stored.directory / f["path"] for f in stored.manifest["files"] if f["path"].startswith("pages-"))
    with open(pages, "r+b") as f:  # a writer of storage flips a page byte once the version is cached
        f.seek(pages.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))

    second = restore(cache)  # a hit: every byte from the pinned entry, no page check on storage
    try:
        assert second.host_pid == proc.pid
        assert second.background_seconds["prefetch-pages"] == 0
        assert ticker.counting(count)
        assert [e.pins for e in cache.entries()] == [0]  # unpinned when the restore ended
    finally:
        ticker.gone(second.host_pid)
    with pytest.raises(ArtifactInvalid, match=r"pages-\d+\.img bytes \d+-\d+ as restored in process \d+'s memory"):
        restore(None)  # without the cache the tampered storage is what would be read: refused
    assert list((tmp_path / "private").iterdir()) == []
