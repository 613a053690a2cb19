"""The node-local checkpoint cache: complete, verified copies of checkpoint versions in a directory on the
node (local NVMe, the agent's only), within a byte budget, so that a restore reads them instead of storage.

    fill      one version from storage: room made first (least recently used entries that no restore
              pins are evicted until it fits the budget, else it is refused before a byte is written);
              written and verified into a temporary directory (``cachefiles.py``), then one rename into
              place. Any failure (a tampered or truncated source, a full disk) removes the temporary
              directory: nothing half-written is ever used. ``begin`` is the same reservation for a
              writer of its own (object storage: ``remote.py`` downloads into ``Filling.tmp``, each chunk
              verified as it lands, and commits pinned); a second fill of a version under way is refused
              (``FillUnderWay``, whose ``done`` a restore waits on before it pins the entry)
    use       an entry is read only when complete and bound to the manifest the restore authenticated from
              storage (the SHA-256 of that manifest's bytes equals the one recorded); a use pins it
    evict     least recently used first, never a pinned entry
    drop      every version of a checkpoint (a pinned one when its last user is done)
    sweep     at start: fills a killed agent left and entries without a valid completion record

Layout (agent-private, mode 0700)::

    <root>/<checkpointID>/<version>/    every file of the version, and COMPLETE (the completion record)
    <root>/.partial/<uuid>/             a fill under way

A restore that reads an entry reads everything from it, the page data included: it was verified when
cached and nobody else can write it, so the background page check is unnecessary (docs/security.md).

    cache = NodeCache(Path("/var/lib/dynamo-snapshot/cache"), 200 << 30)
    with cache.use(checkpoint_id, version, manifest) as entry:   # None on a miss
        ...                                                        # entry.path: the version's files
    cache.fill(checkpoint_id, version, stored_version_dir, manifest)
    with cache.begin(checkpoint_id, version, manifest, need) as filling:   # None: cached already
        ...                                                        # write filling.tmp, then COMPLETE
        pinned = filling.commit_pinned()                           # None: dropped meanwhile
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dynamo_snapshot.agent.artifact import authn, cachefiles, copies
from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact.manifest import default_io_threads
from dynamo_snapshot.agent.artifact.private import PrivateImages
from dynamo_snapshot.agent.errors import AgentError, ArtifactInvalid

log = structlog.get_logger(__name__)

class NodeCacheError(AgentError):
    """The node cache could not take a version (full disk, no room within the budget, I/O error)."""


class NodeCacheFull(NodeCacheError):
    """The version does not fit the byte budget, even with every unpinned entry evicted."""


class LargerThanBudget(NodeCacheFull):
    """The version is larger than the whole byte budget: no eviction makes room for it."""


class FillUnderWay(NodeCacheError):
    """Another fill of the same version is under way; ``done`` is set when it ends (either way)."""

    def __init__(self, message: str, done: threading.Event):
        super().__init__(message)
        self.done = done


@dataclass(frozen=True)
class CacheEntry:
    """One cached version, as metrics see it."""

    checkpoint_id: str
    version: str
    bytes: int
    pins: int
    last_used: float  # wall-clock seconds


@dataclass
class _Entry:
    checkpoint_id: str
    version: str
    path: Path
    bytes: int
    manifest_sha256: str
    last_used: float
    order: int  # least recently used: lowest
    pins: int = 0
    dropped: bool = False  # dropped or evicted while pinned: removed when the last pin goes

    def public(self) -> CacheEntry:
        return CacheEntry(self.checkpoint_id, self.version, self.bytes, self.pins, self.last_used)


class Pinned:
    """A cache entry held by one restore: not evicted, not removed, until ``close()``."""

    verified = True  # every byte, the page data included, was verified when it was cached

    def __init__(self, cache: NodeCache, entry: _Entry):
        self._cache, self._entry = cache, entry
        self.path = entry.path
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cache._unpin(self._entry)


class Filling:
    """Room reserved in the budget for one version, and the temporary directory it is written into
    (``<root>/.partial/<uuid>``): ``commit`` renames it into place (``commit_pinned``: pinned for the
    caller), ``close`` gives the room back and removes what is left of the directory. As a context
    manager it closes at the end, and an OSError (a full disk) or a stop on the way becomes a
    NodeCacheError naming the version."""

    def __init__(self, cache: NodeCache, key: tuple[str, str], need: int, sha256: str, drops: int):
        self.cache, self.key, self.need, self.sha256, self.drops = cache, key, need, sha256, drops
        self.tmp = cache.root / cachefiles.PARTIAL / uuid.uuid4().hex
        self.record = {"checkpointID": key[0], "version": key[1], "manifestSha256": sha256, "bytes": need}
        self._closed = False

    def commit(self) -> CacheEntry | None:
        """The entry, in place; None when its checkpoint was dropped while it was filled (nothing kept)."""
        entry = self.cache._commit(self, pin=False)
        return entry.public() if entry is not None else None

    def commit_pinned(self) -> Pinned | None:
        """``commit``, the entry pinned for the caller before anything can evict it."""
        entry = self.cache._commit(self, pin=True)
        return Pinned(self.cache, entry) if entry is not None else None

    def failed(self, exc: BaseException) -> NodeCacheError:
        root, (checkpoint_id, version) = self.cache.root, self.key
        if isinstance(exc, cachefiles.Stopping):
            return NodeCacheError(f"node cache {root}: the agent is stopping; nothing was cached")
        full = " (the cache disk is full)" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else ""
        cause = (exc.strerror if isinstance(exc, OSError) else None) or exc
        return NodeCacheError(f"node cache {root}: filling {checkpoint_id} version {version} failed{full}: "
                              f"{cause}; nothing was cached")

    def close(self) -> None:
        """The room given back and the temporary directory removed (gone already when committed)."""
        if self._closed:
            return
        self._closed = True
        cachefiles.remove(self.tmp)
        with self.cache._lock:
            done = self.cache._filling.pop(self.key)
            self.cache._reserved -= self.need
        done.set()

    def __enter__(self) -> Filling:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if isinstance(exc, OSError | cachefiles.Stopping):
                raise self.failed(exc) from exc
        finally:
            self.close()


class NodeCache:
    def __init__(self, root: Path, budget_bytes: int, io_threads: int | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"node cache {root}: the byte budget must be positive, got {budget_bytes}")
        self.root, self.budget_bytes = root, budget_bytes
        self.io_threads = io_threads or default_io_threads()
        self._lock = threading.Lock()
        self._tick = itertools.count()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._doomed: list[_Entry] = []  # out of the index, still pinned
        self._filling: dict[tuple[str, str], threading.Event] = {}  # set when that fill ends
        self._reserved = 0
        self._drops: dict[str, int] = {}  # checkpoint ID -> drops so far (a fill begun before one is discarded)
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-cache-fill")
        self._stopping = threading.Event()
        self._sweep()

    # -- start -------------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Take the complete entries left by an earlier agent; remove everything else."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        found: list[tuple[float, _Entry]] = []
        for child in sorted(self.root.iterdir()):
            if child.name == cachefiles.PARTIAL or child.is_symlink() or not child.is_dir():
                cachefiles.remove(child)
                continue
            for version in sorted(child.iterdir()):
                record = cachefiles.read_record(version) if version.is_dir() and not version.is_symlink() else None
                if record is None:
                    log.info("removing an incomplete node cache entry", path=str(version))
                    cachefiles.remove(version)
                    continue
                mtime = (version / cachefiles.RECORD).stat().st_mtime
                found.append((mtime, _Entry(child.name, version.name, version, record["bytes"],
                                            record["manifestSha256"], mtime, 0)))
            with contextlib.suppress(OSError):
                child.rmdir()  # only when empty
        for _, entry in sorted(found, key=lambda pair: pair[0]):
            entry.order = next(self._tick)
            self._entries[(entry.checkpoint_id, entry.version)] = entry
        (self.root / cachefiles.PARTIAL).mkdir(mode=0o700)
        with self._lock:
            gone = self._evict_for(0)  # the budget may have shrunk since
        for entry in gone:
            self._remove_entry(entry.path)

    def _remove_entry(self, path: Path) -> None:
        """An entry's files (outside the lock), then its checkpoint's directory if that is left empty."""
        cachefiles.remove(path)
        with self._lock, contextlib.suppress(OSError):  # under the lock: a commit may be making it
            path.parent.rmdir()

    # -- use ---------------------------------------------------------------------------------------

    def pin(self, checkpoint_id: str, version: str, manifest: dict[str, Any]) -> Pinned | None:
        """The complete entry of this version bound to ``manifest`` (authenticated from storage), pinned;
        None on a miss (not cached, or cached from another manifest)."""
        wanted = authn.sha256_of(manifest)
        with self._lock:
            entry = self._entries.get((checkpoint_id, version))
            if entry is None or wanted is None or entry.manifest_sha256 != wanted:
                if entry is not None:
                    log.info("node cache entry is of another manifest: not used", checkpoint_id=checkpoint_id,
                             version=version, cached=entry.manifest_sha256, authenticated=wanted)
                return None
            entry.pins += 1
            entry.order, entry.last_used = next(self._tick), time.time()
        pinned = Pinned(self, entry)
        try:
            ok = hashlib.sha256((entry.path / authn.MANIFEST).read_bytes()).hexdigest() == wanted
            os.utime(entry.path / cachefiles.RECORD)  # the order survives a restart
        except OSError:
            ok = False
        if not ok:
            log.warning("node cache entry damaged: removed", path=str(entry.path))
            pinned.close()
            self._discard(entry)
            return None
        return pinned

    @contextlib.contextmanager
    def use(self, checkpoint_id: str, version: str, manifest: dict[str, Any]) -> Iterator[Pinned | None]:
        """``pin`` for the block: the entry (or None) is not evicted or removed before it ends."""
        pinned = self.pin(checkpoint_id, version, manifest)
        try:
            yield pinned
        finally:
            if pinned is not None:
                pinned.close()

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            remove = entry.pins == 0 and entry.dropped
            if remove:
                self._doomed.remove(entry)
        if remove:
            self._remove_entry(entry.path)

    def _discard(self, entry: _Entry) -> None:
        """Take ``entry`` out of the index; its files go now, or at its last unpin."""
        with self._lock:
            if self._entries.get((entry.checkpoint_id, entry.version)) is not entry:
                return
            del self._entries[(entry.checkpoint_id, entry.version)]
            later = entry.pins > 0
            if later:
                entry.dropped = True
                self._doomed.append(entry)
        if not later:
            self._remove_entry(entry.path)

    def drop(self, checkpoint_id: str) -> int:
        """Remove every cached version of ``checkpoint_id`` (a pinned one when its last pin goes); a fill
        of it under way is discarded. Returns how many versions were dropped."""
        with self._lock:
            self._drops[checkpoint_id] = self._drops.get(checkpoint_id, 0) + 1
            mine = [e for key, e in self._entries.items() if key[0] == checkpoint_id]
        for entry in mine:
            self._discard(entry)
        return len(mine)

    def entries(self) -> list[CacheEntry]:
        """The complete entries, least recently used first (for metrics)."""
        with self._lock:
            return [e.public() for e in sorted(self._entries.values(), key=lambda e: e.order)]

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used()

    def _used(self) -> int:
        return sum(e.bytes for e in self._entries.values()) + sum(e.bytes for e in self._doomed) + self._reserved

    # -- fill --------------------------------------------------------------------------------------

    def _evict_for(self, need: int) -> list[_Entry]:
        """Under the lock: take least recently used unpinned entries out of the index until ``need`` more
        bytes fit the budget; returns them (their files are removed outside the lock). Raises NodeCacheFull
        (nothing taken out) when even all of them would not do."""
        if self._used() + need <= self.budget_bytes:
            return []
        candidates = sorted((e for e in self._entries.values() if e.pins == 0), key=lambda e: e.order)
        gone, freed, over = [], 0, self._used() + need - self.budget_bytes
        for entry in candidates:
            if freed >= over:
                break
            gone.append(entry)
            freed += entry.bytes
        if freed < over:
            pinned = sorted(f"{e.checkpoint_id}/{e.version}" for e in self._entries.values() if e.pins)
            held = f"; pinned by running restores: {', '.join(pinned)}" if pinned else ""
            raise NodeCacheFull(
                f"node cache {self.root}: {need} more bytes do not fit the budget of {self.budget_bytes} bytes "
                f"({self._used()} in use{held}); raise cache.budgetGiB or restore from storage")
        for entry in gone:
            del self._entries[(entry.checkpoint_id, entry.version)]
            log.info("node cache entry evicted", checkpoint_id=entry.checkpoint_id, version=entry.version,
                     bytes=entry.bytes)
        return gone

    def _reserve(self, key: tuple[str, str], need: int, sha256: str) -> bool:
        """Room for a fill of ``key``; False when that version is already cached from this manifest."""
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.manifest_sha256 == sha256:
                return False
            if key in self._filling:
                raise FillUnderWay(f"node cache {self.root}: {key[0]} version {key[1]} is being filled already",
                                   self._filling[key])
            if need > self.budget_bytes:
                raise LargerThanBudget(
                    f"node cache {self.root}: {key[0]} version {key[1]} is {need} bytes, more than the whole "
                    f"budget of {self.budget_bytes} bytes; raise cache.budgetGiB to cache it")
            if any((e.checkpoint_id, e.version) == key for e in self._doomed):
                raise NodeCacheError(f"node cache {self.root}: {key[0]} version {key[1]} was dropped while a restore "
                                     "reads it; it is filled again once that ends")
            if old is not None and old.pins:
                raise NodeCacheError(f"node cache {self.root}: {key[0]} version {key[1]} is cached from another "
                                     "manifest and in use by a restore; it is filled again once that ends")
            replaced = [old] if old is not None else []
            if old is not None:
                del self._entries[key]
            try:
                gone = self._evict_for(need)
            except NodeCacheFull:
                if old is not None:
                    self._entries[key] = old
                raise
            self._filling[key] = threading.Event()
            self._reserved += need
        for entry in [*replaced, *gone]:
            self._remove_entry(entry.path)
        return True

    def begin(self, checkpoint_id: str, version: str, manifest: dict[str, Any], need: int) -> Filling | None:
        """Room for ``need`` bytes of this version of the authenticated ``manifest`` (least recently used
        unpinned entries evicted for it) and a temporary directory to write it into; None when it is
        cached from this manifest already. NodeCacheFull: it cannot fit; FillUnderWay: another fill of it
        runs (wait for ``done``, then pin)."""
        artifact_layout.ArtifactLayout(self.root, checkpoint_id, version)  # names that make directories
        sha256 = authn.sha256_of(manifest)
        if sha256 is None:
            raise NodeCacheError(f"node cache {self.root}: {checkpoint_id} version {version}: the manifest was not "
                                 "authenticated (authn.open_manifest); nothing is cached from it")
        key = (checkpoint_id, version)
        with self._lock:
            drops = self._drops.get(checkpoint_id, 0)
        if not self._reserve(key, need, sha256):
            return None
        filling = Filling(self, key, need, sha256, drops)
        try:
            filling.tmp.mkdir(mode=0o700)
        except OSError as exc:
            filling.close()
            raise filling.failed(exc) from exc
        return filling

    def fill(self, checkpoint_id: str, version: str, source: Path | int, manifest: dict[str, Any],
             where: Path | None = None) -> CacheEntry | None:
        """Cache the stored version ``source`` (its directory, or a descriptor of it) of the authenticated
        ``manifest``; None when it is cached already. ArtifactInvalid names a source file that is not what
        the manifest lists; NodeCacheError a fill the cache cannot take. Either way nothing is left."""
        artifact_layout.ArtifactLayout(self.root, checkpoint_id, version)  # names that make directories
        where = where or (source if isinstance(source, Path) else Path(f"/proc/self/fd/{source}"))
        dir_fd = os.open(source, copies.DIRECTORY) if isinstance(source, Path) else os.dup(source)
        try:
            return self._fill(checkpoint_id, version, dir_fd, where, manifest)
        finally:
            os.close(dir_fd)

    def _fill(self, checkpoint_id: str, version: str, dir_fd: int, where: Path,
              manifest: dict[str, Any]) -> CacheEntry | None:
        sidecars = [(name, copies.open_regular(dir_fd, name, where), limit) for name, limit in cachefiles.SIDECARS]
        try:
            sizes = {name: os.fstat(fd).st_size for name, fd, _ in sidecars}
            for name, _, limit in sidecars:
                if sizes[name] > limit:
                    raise ArtifactInvalid(f"{where / name} is larger than the {limit} bytes an agent reads")
            need = cachefiles.listed_bytes(manifest) + sum(sizes.values())
            filling = self.begin(checkpoint_id, version, manifest, need)
            if filling is None:
                return None
            with filling:
                cachefiles.write_version(filling.tmp, dir_fd, where, manifest, sidecars, sizes, filling.record,
                                         io_threads=self.io_threads, stopping=self._stopping)
                return filling.commit()
        finally:
            for _, fd, _ in sidecars:
                os.close(fd)

    def _commit(self, filling: Filling, pin: bool) -> _Entry | None:
        key = filling.key
        with self._lock:
            if self._drops.get(key[0], 0) != filling.drops:
                log.info("node cache fill discarded: the checkpoint was dropped meanwhile",
                         checkpoint_id=key[0], version=key[1])
                return None
            parent = self.root / key[0]
            parent.mkdir(mode=0o700, exist_ok=True)
            final = parent / key[1]
            os.rename(filling.tmp, final)  # fails if something is there: the index said nothing was
            cachefiles.fsync_dir(parent)
            entry = _Entry(key[0], key[1], final, filling.need, filling.sha256, time.time(), next(self._tick),
                           pins=1 if pin else 0)
            self._entries[key] = entry
        log.info("node cache filled", checkpoint_id=key[0], version=key[1], bytes=filling.need)
        return entry

    def fill_in_background(self, checkpoint_id: str, version: str, source: Path,
                           manifest: dict[str, Any]) -> Future[CacheEntry | None] | None:
        """``fill`` on the cache's own thread, one at a time; a failure is logged, not raised. ``source``
        is opened now (storage may be closed by the time the fill runs). None when it is cached already."""
        wanted = authn.sha256_of(manifest)
        with self._lock:
            cached = self._entries.get((checkpoint_id, version))
            if cached is not None and cached.manifest_sha256 == wanted:
                return None
        dir_fd = os.open(source, copies.DIRECTORY)

        def run() -> CacheEntry | None:
            try:
                return self.fill(checkpoint_id, version, dir_fd, manifest, where=source)
            except (AgentError, OSError, ValueError) as exc:
                log.warning("node cache fill failed; the next restore reads storage again",
                            checkpoint_id=checkpoint_id, version=version, error=str(exc))
                return None
            finally:
                os.close(dir_fd)

        try:
            return self._background.submit(run)
        except RuntimeError:  # shut down
            os.close(dir_fd)
            return None

    def settle(self) -> None:
        """Wait until the background fills queued so far are done (they run in order, one at a time)."""
        with contextlib.suppress(RuntimeError):  # shut down: nothing is queued
            self._background.submit(lambda: None).result()

    def close(self) -> None:
        """The agent stops: queued fills are cancelled, one under way gives up at its next file (its
        temporary directory removed); nothing waits for them."""
        self._stopping.set()
        self._background.shutdown(wait=False, cancel_futures=True)


def restore_images(cache: NodeCache | None, stored: Path, manifest: dict[str, Any], version: str,
                   private_root: Path, io_threads: int | None) -> Pinned | PrivateImages:
    """What a restore reads: the pinned cache entry bound to the authenticated ``manifest`` (everything
    verified, the page data included), else the private copies of the stored version's parsed files."""
    if cache is not None and (hit := cache.pin(str(manifest["checkpointID"]), version, manifest)) is not None:
        log.info("restoring from the node cache", checkpoint_id=manifest["checkpointID"], version=version,
                 path=str(hit.path))
        return hit
    return PrivateImages.prepare(stored, manifest, private_root, io_threads)


def fill_after_restore(cache: NodeCache | None, stored: Path, manifest: dict[str, Any],
                       version: str) -> Future[CacheEntry | None] | None:
    """After a restore from storage: fill the cache in the background (a failure only logs)."""
    if cache is None:
        return None
    try:
        return cache.fill_in_background(str(manifest["checkpointID"]), version, stored, manifest)
    except OSError as exc:
        log.warning("node cache fill not started", checkpoint_id=manifest.get("checkpointID"), error=str(exc))
        return None
