"""The checkpoint artifact on storage: layout, manifest, verification, atomic promotion (SPEC section 6).

    <base>/<checkpointID>/versions/tmp/<uuid>/        staging, written by one checkpoint run
    <base>/<checkpointID>/versions/<artifactVersion>/  promoted by a single rename(2)

The version directory holds CRIU's images and ``dump.log``, ``rootfs-diff.tar``,
``deleted-files.json``, ``dev-shm.tar`` and ``manifest.json``. The manifest is written last and lists
every other file with its size and SHA-256: no manifest, no checkpoint. A restore verifies all of it
(and that nothing else is there) before it touches the placeholder.

Files larger than ``DIGEST_CHUNK`` carry one SHA-256 per chunk (``chunkBytes``, ``chunkSha256``)
instead of one for the whole file, so both sides hash with every core: a GPU worker's page image
is one file of many GiB, and a single SHA-256 stream over it (about 2 GB/s) would cost more than
reading it. Verification reads every byte with ``io_threads`` readers in parallel, which also brings
the image into the page cache ahead of CRIU's sequential reads (the restore's prefetch).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from dynamo_snapshot.agent.cuda.devices import recorded_gpus
from dynamo_snapshot.agent.errors import ArtifactIncompatible, ArtifactInvalid, CheckpointError
from dynamo_snapshot.api import names

log = structlog.get_logger(__name__)

MANIFEST = names.MANIFEST_FILE
DUMP_LOG = names.DUMP_LOG_FILE
DELETED_FILES = names.DELETED_FILES_FILE
ROOTFS_DIFF = "rootfs-diff.tar"
DEV_SHM = "dev-shm.tar"
MANIFEST_FORMAT = 1
_CHUNK = 4 << 20
DIGEST_CHUNK = 64 << 20  # files above this get one digest per chunk; chunks are hashed in parallel
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def _check_name(kind: str, value: str) -> str:
    if not _SAFE_ID.match(value) or value == names.STAGING_DIR:
        raise ValueError(f"{kind} {value!r} cannot be a directory name under the checkpoint base path")
    return value


@dataclass(frozen=True)
class ArtifactLayout:
    base: Path
    checkpoint_id: str
    artifact_version: str = "1"

    def __post_init__(self) -> None:
        _check_name("checkpoint ID", self.checkpoint_id)
        _check_name("artifact version", self.artifact_version)

    @property
    def versions_dir(self) -> Path:
        return self.base / self.checkpoint_id / names.VERSIONS_DIR

    @property
    def staging_root(self) -> Path:
        return self.versions_dir / names.STAGING_DIR

    @property
    def final_dir(self) -> Path:
        return self.versions_dir / self.artifact_version

    def failed_log(self, staging: Path) -> Path:
        """Where the dump log of a failed attempt is kept once its staging directory is discarded."""
        return self.base / self.checkpoint_id / "failed" / staging.name / DUMP_LOG

    def new_staging(self) -> Path:
        if self.final_dir.exists():
            raise CheckpointError(
                f"checkpoint {self.checkpoint_id} version {self.artifact_version} already exists at {self.final_dir}"
            )
        staging = self.staging_root / str(uuid.uuid4())
        staging.mkdir(parents=True)
        return staging

    def promote(self, staging: Path) -> Path:
        """Move the staging directory to its final name in one rename that never replaces anything."""
        _fsync_dir(staging)
        _rename_noreplace(staging, self.final_dir)
        _fsync_dir(self.versions_dir)
        return self.final_dir




def withdraw(final: Path) -> None:
    """Take a promoted version back out (it was never confirmed): one rename out of ``versions/`` into
    its staging area, so restores stop seeing it at once, then removal."""
    versions = final.parent
    doomed = versions / names.STAGING_DIR / f"withdrawn-{uuid.uuid4()}"
    doomed.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(final, doomed)
    except FileNotFoundError:
        return
    _fsync_dir(versions)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_noreplace(src: Path, dst: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # libc without renameat2: a plain rename refuses a non-empty target anyway
        if dst.exists():
            raise CheckpointError(f"cannot promote {src}: {dst} already exists")
        os.rename(src, dst)
        return
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) != 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise CheckpointError(f"cannot promote {src}: {dst} already exists")
        raise OSError(err, f"rename {src} -> {dst}: {os.strerror(err)}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_io_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def sha256_range(path: Path, offset: int, length: int) -> str:
    """SHA-256 of ``length`` bytes of ``path`` from ``offset`` (pread and hashlib release the GIL)."""
    h = hashlib.sha256()
    buf = bytearray(min(_CHUNK, max(length, 1)))
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < length:
            n = os.preadv(fd, [view[: min(len(buf), length - done)]], offset + done)
            if n <= 0:
                raise ArtifactInvalid(f"{path} ends at byte {offset + done}, before the {length} bytes to hash")
            h.update(view[:n])
            done += n
    finally:
        os.close(fd)
    return h.hexdigest()


def _ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(chunk, size - start)) for start in range(0, size, chunk)] or [(0, 0)]


def _hash_all(jobs: list[tuple[Path, int, int]], threads: int) -> list[str]:
    """Digest (path, offset, length) jobs with ``threads`` readers, results in job order."""
    if threads <= 1 or len(jobs) <= 1:
        return [sha256_range(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="digest") as pool:
        return list(pool.map(lambda job: sha256_range(*job), jobs))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Compatibility:
    """What must match between the node that dumped and the node that restores."""

    criu_version: str
    kernel: str
    architecture: str
    cuda_driver_version: str | None = None  # NVIDIA driver release, e.g. "580.159.04"
    gpus: tuple[str, ...] = ()  # GPU UUIDs (the ones the checkpoint used; on a node: all of them)
    gpu_models: tuple[str, ...] = ()  # the model of each of ``gpus``, "" when unknown

    @classmethod
    def of_this_node(
        cls,
        criu_version: str,
        cuda_driver_version: str | None = None,
        gpus: tuple[str, ...] = (),
        gpu_models: tuple[str, ...] = (),
    ) -> Compatibility:
        return cls(criu_version, platform.release(), platform.machine(), cuda_driver_version, gpus, gpu_models)

    def to_json(self) -> dict[str, Any]:
        models = list(self.gpu_models) + [""] * (len(self.gpus) - len(self.gpu_models))
        return {
            "criuVersion": self.criu_version,
            "kernel": self.kernel,
            "architecture": self.architecture,
            "cudaDriverVersion": self.cuda_driver_version,
            "gpus": [{"uuid": u, "model": m} for u, m in zip(self.gpus, models, strict=False)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Compatibility:
        gpus, models = recorded_gpus(data.get("gpus"))
        return cls(
            criu_version=str(data["criuVersion"]),
            kernel=str(data["kernel"]),
            architecture=str(data["architecture"]),
            cuda_driver_version=data.get("cudaDriverVersion"),
            gpus=tuple(gpus),
            gpu_models=tuple(models),
        )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_compatible(recorded: Compatibility, here: Compatibility) -> list[str]:
    """Raise ArtifactIncompatible when this node cannot restore the artifact; return warnings for
    differences CRIU copes with (the kernel release)."""
    problems = []
    if recorded.architecture != here.architecture:
        problems.append(f"made on {recorded.architecture}, this node is {here.architecture}")
    dumped, restoring = _version_tuple(recorded.criu_version), _version_tuple(here.criu_version)
    if not dumped or not restoring or dumped[0] != restoring[0] or restoring < dumped:
        problems.append(
            f"made by CRIU {recorded.criu_version}, this node has CRIU {here.criu_version} "
            "(needs the same major version, not older)"
        )
    if recorded.cuda_driver_version and not here.cuda_driver_version:
        problems.append(f"holds CUDA state (driver {recorded.cuda_driver_version}) but this node has no CUDA driver")
    elif recorded.cuda_driver_version and here.cuda_driver_version != recorded.cuda_driver_version:
        # The restored process maps the user-space driver libraries of the release it ran with.
        problems.append(
            f"holds CUDA state of NVIDIA driver {recorded.cuda_driver_version}, this node has driver "
            f"{here.cuda_driver_version} (a CUDA checkpoint restores only on the same driver release)"
        )
    if recorded.cuda_driver_version and here.cuda_driver_version:
        needed = collections.Counter(m for m in recorded.gpu_models if m)
        present = collections.Counter(here.gpu_models)
        short = [f"{n} x {model} (node has {present[model]})" for model, n in needed.items() if present[model] < n]
        if short:
            problems.append("needs GPUs this node lacks: " + ", ".join(short))
    if problems:
        raise ArtifactIncompatible("checkpoint cannot be restored here: " + "; ".join(problems))
    warnings = []
    if recorded.kernel != here.kernel:
        warnings.append(f"made on kernel {recorded.kernel}, restoring on {here.kernel}")
    return warnings


def write_manifest(
    staging: Path, fields: dict[str, Any], io_threads: int | None = None, chunk_bytes: int = DIGEST_CHUNK
) -> dict[str, Any]:
    """Digest every file in ``staging`` (in parallel) and write ``manifest.json`` last, atomically."""
    threads = io_threads or default_io_threads()
    paths: list[tuple[str, Path, int]] = []
    for path in sorted(p for p in staging.rglob("*") if not p.is_dir()):
        rel = path.relative_to(staging).as_posix()
        if rel == MANIFEST or rel.startswith(f".{MANIFEST}"):
            continue
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path} is not a regular file; an artifact holds regular files only")
        paths.append((rel, path, path.stat().st_size))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fsync") as pool:
        list(pool.map(_fsync_file, [path for _, path, _ in paths]))
    jobs: list[tuple[Path, int, int]] = []
    for _, path, size in paths:
        pieces = _ranges(size, chunk_bytes) if size > chunk_bytes else [(0, size)]
        jobs += [(path, start, length) for start, length in pieces]
    digests = iter(_hash_all(jobs, threads))
    files = []
    for rel, _, size in paths:
        if size > chunk_bytes:
            chunks = [next(digests) for _ in _ranges(size, chunk_bytes)]
            files.append({"path": rel, "size": size, "chunkBytes": chunk_bytes, "chunkSha256": chunks})
        else:
            files.append({"path": rel, "size": size, "sha256": next(digests)})
    manifest = {"formatVersion": MANIFEST_FORMAT, **fields, "files": files}
    tmp = staging / f".{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactInvalid(f"{path} is missing: the checkpoint was never completed") from None
    except (OSError, ValueError) as exc:
        raise ArtifactInvalid(f"{path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactInvalid(f"{path} is not a JSON object")
    return manifest


def verify(
    directory: Path, checkpoint_id: str, here: Compatibility, io_threads: int | None = None
) -> dict[str, Any]:
    """Check the artifact before anything is restored from it; returns the manifest.

    Refuses: a missing or unreadable manifest, another checkpoint ID, an incompatible node, a
    missing, resized or altered file, and any file the manifest does not list."""
    manifest = verify_listing(directory, checkpoint_id, here)
    verify_digests(directory, manifest, io_threads=io_threads)
    return manifest


def verify_listing(directory: Path, checkpoint_id: str, here: Compatibility) -> dict[str, Any]:
    """Every check of ``verify`` but the digests: manifest, checkpoint ID, compatibility, every listed
    file present with its size, nothing unlisted. Returns the manifest."""
    manifest = read_manifest(directory)
    if manifest.get("formatVersion") != MANIFEST_FORMAT:
        raise ArtifactInvalid(
            f"{directory / MANIFEST} has format version {manifest.get('formatVersion')!r}; "
            f"this agent reads version {MANIFEST_FORMAT}"
        )
    if manifest.get("checkpointID") != checkpoint_id:
        raise ArtifactInvalid(
            f"{directory} holds checkpoint {manifest.get('checkpointID')!r}, not the requested {checkpoint_id!r}"
        )
    try:
        recorded = Compatibility.from_json(manifest["compatibility"])
    except (KeyError, TypeError) as exc:
        raise ArtifactInvalid(f"{directory / MANIFEST} has no usable compatibility record ({exc})") from exc
    for warning in check_compatible(recorded, here):
        log.warning("restoring across a difference", checkpoint_id=checkpoint_id, difference=warning)

    listed: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("files") or []:
        rel = str(entry.get("path", ""))
        if not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise ArtifactInvalid(f"{directory / MANIFEST} lists an unsafe path {rel!r}")
        listed[rel] = entry
    present = {
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir() and p.name != MANIFEST
    }
    if extra := sorted(present - set(listed)):
        raise ArtifactInvalid(f"{directory} holds files the manifest does not list: {', '.join(extra[:5])}")
    for rel, entry in sorted(listed.items()):
        path = directory / rel
        if not path.is_file() or path.is_symlink():
            raise ArtifactInvalid(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise ArtifactInvalid(f"{path} is {size} bytes; the manifest says {entry.get('size')}")
    return manifest


def is_page_data(rel: str) -> bool:
    """CRIU's raw page contents (``pages-<n>.img``): copied into memory, never parsed by CRIU, so a
    restore may start CRIU before they are verified, as long as the restored tasks wait for it."""
    return rel.startswith("pages-") and rel.endswith(".img")


def is_parsed(rel: str) -> bool:
    """Everything but the raw page data: what must be verified before CRIU or the agent reads it."""
    return not is_page_data(rel)


def verify_digests(
    directory: Path,
    manifest: dict[str, Any],
    only: Callable[[str], bool] = lambda rel: True,
    io_threads: int | None = None,
) -> None:
    """Check the SHA-256 of every byte of the listed files that ``only`` selects (after
    ``verify_listing``), ``io_threads`` readers in parallel."""
    jobs: list[tuple[Path, int, int]] = []
    expected: list[tuple[str, int, int, int, str]] = []  # path, offset, length, file size, digest
    for entry in sorted(manifest.get("files") or [], key=lambda e: str(e.get("path"))):
        rel = str(entry["path"])
        if not only(rel):
            continue
        path, size = directory / rel, int(entry["size"])
        chunk = entry.get("chunkBytes")
        if chunk is not None:
            digests = entry.get("chunkSha256") or []
            ranges = _ranges(size, int(chunk)) if isinstance(chunk, int) and chunk > 0 else []
            if not ranges or len(digests) != len(ranges):
                raise ArtifactInvalid(f"{directory / MANIFEST} has a malformed chunk list for {rel}")
            for (start, length), digest in zip(ranges, digests, strict=True):
                jobs.append((path, start, length))
                expected.append((rel, start, length, size, str(digest)))
        else:
            jobs.append((path, 0, size))
            expected.append((rel, 0, size, size, str(entry.get("sha256"))))
    digests = _hash_all(jobs, io_threads or default_io_threads())
    for (rel, start, length, size, want), got in zip(expected, digests, strict=True):
        if got != want:
            where = f" in bytes {start}-{start + length}" if length != size else ""
            raise ArtifactInvalid(f"{directory / rel} has SHA-256 {got}{where}; the manifest says {want}")


def discard_staging(staging: Path, keep_log_at: Path | None = None) -> None:
    """Remove a failed attempt's staging directory, keeping its dump log for the post-mortem."""
    if keep_log_at is not None and (staging / DUMP_LOG).is_file():
        keep_log_at.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / DUMP_LOG, keep_log_at)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(staging)


RESTORES = "restores"  # <base>/<checkpoint ID>/restores/<attempt>: CRIU's restore.log and pidfile
KEEP_RESTORE_LOGS = 8
RESTORE_LOG_MIN_AGE_S = 3600.0


def prune_restore_logs(
    restores: Path, keep: int = KEEP_RESTORE_LOGS, min_age_s: float = RESTORE_LOG_MIN_AGE_S, now: float | None = None
) -> list[str]:
    """Remove the oldest restore work directories beyond the newest ``keep``: a checkpoint restored by a
    fleet for months would otherwise collect one CRIU log per restore. Never one younger than
    ``min_age_s`` (another node may be restoring from the same checkpoint into it right now), never
    through a symlink. Returns the names removed."""
    try:
        entries = [e for e in os.scandir(restores) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    aged = sorted(((e.stat(follow_symlinks=False).st_mtime, e) for e in entries), key=lambda t: t[0], reverse=True)
    now = time.time() if now is None else now
    removed = []
    for mtime, entry in aged[keep:]:
        if now - mtime >= min_age_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
