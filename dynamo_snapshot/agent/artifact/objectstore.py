"""Checkpoints in object storage (S3): upload a promoted version, download one into the node cache.

    s3://<bucket>/<prefix>/<checkpointID>/versions/<artifactVersion>/<file>   every file of the version
    .../versions/<artifactVersion>/manifest.json.mac                          its MAC (``authn.py``)
    .../versions/<artifactVersion>/manifest.json                              written LAST: the commit point

Upload stages (``upload_version``):
    open      the local version's manifest, authenticated (``authn.open_manifest``) and shape-checked, every
              listed file present with its size
    refuse    a destination that already has a manifest (a committed version is never replaced)
    files     every listed file, ``concurrency`` at a time; big ones in parallel multipart parts
    commit    the MAC, then ``manifest.json`` (create-only): until it lands, nothing restores the version

Download stages, into a node cache fill's temporary directory (``remote.py`` reserves it in the budget,
pins a complete entry, and commits it; nothing else on the node holds a fetched version):
    manifest  ``fetch_manifest``: ``manifest.json`` and its MAC, size-bounded; no manifest: "not a
              checkpoint"; then ``authn.authenticate`` on their bytes - nothing else from the bucket is
              trusted before it passes
    plan      the pieces (pure: ``plan_pieces``): one per digest of the manifest (each chunk of a chunked
              file, else the whole file), paths checked to stay below the version directory
    fetch     ``download_files``: every file created and allocated at its listed size (a disk too small
              fails before a byte is fetched), then ``concurrency`` ranged GETs at a time (at most
              ``MAX_PIECE`` bytes each), hashed as they land and written (pwrite); a piece whose digest
              differs names the object and the byte range; then every file synced

The S3 calls go through ``ObjectClient`` (``s3.py`` implements it with obstore); this module decides what
to read, write and check.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import anyio
import anyio.abc

from dynamo_snapshot.agent.artifact import authn
from dynamo_snapshot.agent.artifact import fields as manifest_fields
from dynamo_snapshot.agent.artifact.layout import ArtifactLayout
from dynamo_snapshot.agent.errors import ArtifactInvalid, CheckpointError, SnapshotError
from dynamo_snapshot.api import names

MANIFEST = names.MANIFEST_FILE
MAC_FILE = names.MANIFEST_MAC_FILE
DEFAULT_CONCURRENCY = 8
MAX_PIECE = 64 << 20  # a single-digest file is fetched in ranges of at most this, hashed in order


class ObjectStoreError(SnapshotError):
    """The object store refused or failed a call (credentials, bucket, network); names the object."""


class ObjectClient(Protocol):
    """The S3 calls the backend needs. ``get`` returns None for a missing object."""

    def url(self, key: str) -> str: ...
    async def get(self, key: str, max_bytes: int) -> bytes | None: ...
    async def get_range(self, key: str, start: int, length: int) -> bytes: ...
    async def exists(self, key: str) -> bool: ...
    async def put_bytes(self, key: str, data: bytes, create_only: bool = False) -> None: ...
    async def put_file(self, key: str, path: Path) -> None: ...
    async def delete(self, key: str) -> None: ...  # a missing object is no error
    async def list_keys(self, prefix: str) -> list[str]: ...  # every key below prefix/ (path segments)
    async def delete_many(self, keys: list[str]) -> None: ...  # in bulk; missing objects are no error


@dataclass(frozen=True)
class Location:
    """Where one version of a checkpoint lives in a bucket (the client knows the bucket)."""

    prefix: str
    checkpoint_id: str
    artifact_version: str = "1"

    def __post_init__(self) -> None:
        ArtifactLayout(Path("/"), self.checkpoint_id, self.artifact_version)  # the names are one path part each

    def key(self, rel: str = "") -> str:
        parts = [self.prefix.strip("/"), self.checkpoint_id, names.VERSIONS_DIR, self.artifact_version, rel]
        return "/".join(p for p in parts if p)


@dataclass(frozen=True)
class Piece:
    """Bytes [start, start+length) of file ``rel``, which ``digest`` covers exactly: fetched by ranged GETs
    of at most ``MAX_PIECE`` bytes in order, hashed as they land."""

    rel: str
    start: int
    length: int
    digest: str


@contextlib.asynccontextmanager
async def _together() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group whose first failure leaves it as itself (the others are cancelled with it), so callers
    catch ``ArtifactInvalid``/``ObjectStoreError`` rather than an ExceptionGroup."""
    try:
        async with anyio.create_task_group() as group:
            yield group
    except BaseExceptionGroup as errors:
        leaves = _leaves(errors)
        raise leaves[0] from (errors if len(leaves) > 1 else None)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for err in group.exceptions:
        out += _leaves(err) if isinstance(err, BaseExceptionGroup) else [err]
    return out


def safe_rel(rel: str, where: str) -> str:
    """A manifest path that stays below the version directory and is not one of its sidecars."""
    parts = PurePosixPath(rel).parts
    if (not rel or rel.startswith("/") or "\\" in rel or any(p in ("..", ".") for p in parts)
            or rel in (MANIFEST, MAC_FILE) or "//" in rel):
        raise ArtifactInvalid(f"{where} lists an unsafe path {rel!r}")
    return rel


def plan_pieces(manifest: dict[str, Any], where: str) -> list[Piece]:
    """One piece per digest of the manifest (each chunk of a chunked file, else the whole file) (pure)."""
    pieces: list[Piece] = []
    for entry in manifest["files"]:
        rel, size = safe_rel(str(entry["path"]), where), int(entry["size"])
        chunk = entry.get("chunkBytes")
        if chunk is None:
            pieces.append(Piece(rel, 0, size, str(entry["sha256"])))
            continue
        digests = list(entry["chunkSha256"])
        starts = list(range(0, size, chunk)) or [0]
        if len(digests) != len(starts):
            raise ArtifactInvalid(f"{where} has a malformed chunk list for {rel}")
        pieces += [Piece(rel, s, min(chunk, size - s), d) for s, d in zip(starts, digests, strict=True)]
    return sorted(pieces, key=lambda p: -p.length)  # the big pieces first: the long poles start early


def _listed(directory: Path, manifest: dict[str, Any]) -> list[tuple[str, Path]]:
    where = str(directory / MANIFEST)
    out = []
    for entry in manifest["files"]:
        rel = safe_rel(str(entry["path"]), where)
        path = directory / rel
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path} is listed in the manifest but is not a regular file: not uploaded")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path} is {path.stat().st_size} bytes; the manifest says {entry['size']}")
        out.append((rel, path))
    return out


async def upload_version(client: ObjectClient, directory: Path, location: Location, keyring: authn.Keyring,
                         concurrency: int = DEFAULT_CONCURRENCY) -> dict[str, Any]:
    """Upload the promoted version ``directory`` to ``location``, the manifest last; returns the manifest."""
    manifest = authn.open_manifest(directory, keyring)
    manifest_fields.check(manifest, str(directory / MANIFEST))
    if manifest["checkpointID"] != location.checkpoint_id:
        raise CheckpointError(f"{directory} holds checkpoint {manifest['checkpointID']!r}, "
                              f"not {location.checkpoint_id!r}: not uploaded to {client.url(location.key())}")
    files = _listed(directory, manifest)
    if await client.exists(location.key(MANIFEST)):
        raise CheckpointError(f"{client.url(location.key(MANIFEST))} already exists: version "
                              f"{location.artifact_version} of {location.checkpoint_id} is committed and never "
                              "replaced (raise the artifactVersion to take a new one)")
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(rel: str, path: Path) -> None:
        async with limiter:
            await client.put_file(location.key(rel), path)

    async with _together() as tg:
        for rel, path in files:
            tg.start_soon(one, rel, path)
    await client.put_bytes(location.key(MAC_FILE), (directory / MAC_FILE).read_bytes())
    await client.put_bytes(location.key(MANIFEST), (directory / MANIFEST).read_bytes(), create_only=True)
    return manifest


async def uncommit(client: ObjectClient, location: Location) -> bool:
    """Take back the commit of a version that was never confirmed: the manifest (the commit point), then
    its MAC; the data objects stay, not restorable, until an upload writes over them. Returns whether
    there was a commit. Only an attempt holding the checkpoint's Lease for a Job without a verdict calls
    it (nothing vouches for such a version, and nothing restored from it: restores need the verdict)."""
    committed = await client.exists(location.key(MANIFEST))
    await client.delete(location.key(MANIFEST))
    await client.delete(location.key(MAC_FILE))
    return committed


async def withdraw_version(client: ObjectClient, location: Location, manifest: dict[str, Any]) -> None:
    """Take back a committed version whose confirmation failed: ``uncommit`` (the manifest first, so no
    reader ever sees the version half gone), then every file the manifest lists (keys inside the
    version's prefix)."""
    await uncommit(client, location)
    keys = [location.key(safe_rel(str(e.get("path", "")), client.url(location.key(MANIFEST))))
            for e in manifest.get("files") or []]
    async with _together() as tg:
        for key in keys:
            tg.start_soon(client.delete, key)


def checkpoint_prefix(prefix: str, checkpoint_id: str) -> str:
    """``<prefix>/<checkpointID>``: the key prefix of every version of a checkpoint (the ID one path part)."""
    ArtifactLayout(Path("/"), checkpoint_id)
    return "/".join(p for p in (prefix.strip("/"), checkpoint_id) if p)


async def delete_checkpoint(client: ObjectClient, prefix: str, checkpoint_id: str) -> int:
    """Every object of the checkpoint - every version, and anything else below ``<prefix>/<id>/`` - and
    nothing else: the manifests first, in one request (each version's commit point: a reader that has not
    fetched one yet finds no checkpoint rather than half of one), then the rest. Returns how many objects
    were deleted; raises ObjectStoreError when some are there after it (an upload still running)."""
    root = checkpoint_prefix(prefix, checkpoint_id)
    keys = [key for key in await client.list_keys(root) if key.startswith(root + "/")]  # a prefix of paths
    commits = [key for key in keys if key.endswith("/" + MANIFEST)]
    if commits:
        await client.delete_many(commits)
    if rest := sorted(set(keys) - set(commits)):
        await client.delete_many(rest)
    if left := await client.list_keys(root):
        raise ObjectStoreError(f"{client.url(root)}/ still holds {len(left)} objects after {len(keys)} were deleted "
                               f"(e.g. {client.url(left[0])}): something wrote there meanwhile; retried")
    return len(keys)


async def fetch_manifest(client: ObjectClient, location: Location,
                         keyring: authn.Keyring) -> tuple[authn.AuthenticatedManifest, bytes, bytes]:
    """The version's manifest, authenticated before anything else from the bucket is trusted, with the
    exact bytes of it and of its MAC (what a node cache entry keeps)."""
    data = await client.get(location.key(MANIFEST), authn.MAX_MANIFEST_BYTES)
    if data is None:
        raise ArtifactInvalid(
            f"{client.url(location.key())}/ has no {MANIFEST}: it is not a checkpoint (its upload never "
            "completed, or it was never taken, or it was deleted); nothing there is restored")
    mac = await client.get(location.key(MAC_FILE), authn.MAX_MAC_BYTES)
    manifest = authn.authenticate(data, mac, keyring, client.url(location.key()))
    manifest_fields.check(manifest, client.url(location.key(MANIFEST)))
    if manifest["checkpointID"] != location.checkpoint_id:
        raise ArtifactInvalid(f"{client.url(location.key(MANIFEST))} is of checkpoint "
                              f"{manifest['checkpointID']!r}, not {location.checkpoint_id!r}")
    plan_pieces(manifest, client.url(location.key(MANIFEST)))  # the paths are safe before any is created
    assert mac is not None  # authenticate refuses a version without one
    return manifest, data, mac


class _Files:
    """The files being written: created and allocated at full size first (a disk too small fails here,
    before a byte is fetched), written by offset."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.fds: dict[str, int] = {}
        try:
            for entry in manifest["files"]:
                path = directory / entry["path"]
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                self.fds[entry["path"]] = fd
                _allocate(fd, int(entry["size"]))
        except BaseException:
            self.close(sync=False)
            raise

    def write(self, rel: str, offset: int, data: bytes) -> None:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.fds[rel], view[done:], offset + done)

    def close(self, sync: bool) -> None:
        while self.fds:
            _, fd = self.fds.popitem()
            try:
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)


def _allocate(fd: int, size: int) -> None:
    """The file's blocks reserved (``posix_fallocate``; ENOSPC when they do not fit), else only its size."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: a full disk shows at the write


async def _fetch_piece(client: ObjectClient, location: Location, piece: Piece, files: _Files,
                       limiter: anyio.CapacityLimiter, sizes: dict[str, int]) -> None:
    key = location.key(piece.rel)
    digest = hashlib.sha256()
    for offset in range(piece.start, piece.start + piece.length, MAX_PIECE) if piece.length else ():
        want = min(MAX_PIECE, piece.start + piece.length - offset)
        async with limiter:
            data = await client.get_range(key, offset, want)
        if len(data) != want:
            raise ArtifactInvalid(f"{client.url(key)} returned {len(data)} bytes for bytes {offset}-"
                                  f"{offset + want}: the object is shorter than the manifest says")
        await anyio.to_thread.run_sync(digest.update, data)
        await anyio.to_thread.run_sync(files.write, piece.rel, offset, data)
    if (got := digest.hexdigest()) != piece.digest:
        span = "" if piece.length == sizes[piece.rel] else f" in bytes {piece.start}-{piece.start + piece.length}"
        raise ArtifactInvalid(f"{client.url(key)} has SHA-256 {got}{span}; the manifest says {piece.digest}: "
                              "the object was altered or replaced, the version is not restored")


async def _fetch_all(client: ObjectClient, location: Location, manifest: dict[str, Any], files: _Files,
                     concurrency: int) -> None:
    pieces = plan_pieces(manifest, client.url(location.key(MANIFEST)))
    sizes = {str(e["path"]): int(e["size"]) for e in manifest["files"]}
    limiter = anyio.CapacityLimiter(concurrency)
    async with _together() as tg:
        for piece in pieces:
            tg.start_soon(_fetch_piece, client, location, piece, files, limiter, sizes)


async def download_files(client: ObjectClient, location: Location, manifest: dict[str, Any], directory: Path,
                         concurrency: int = DEFAULT_CONCURRENCY) -> None:
    """Every file ``manifest`` (authenticated: ``fetch_manifest``) lists, fetched into the empty directory
    ``directory`` by parallel ranged reads, each piece checked against its digest as it lands, then
    synced. On any failure what was written stays for the caller to remove (a node cache fill's
    temporary directory: ``remote.py``)."""
    files = await anyio.to_thread.run_sync(_Files, directory, manifest)
    try:
        await _fetch_all(client, location, manifest, files, concurrency)
        await anyio.to_thread.run_sync(files.close, True)
    finally:
        files.close(sync=False)  # a no-op once closed
