"""The checkpoint artifact's manifest (SPEC section 6): digests, the compatibility record, writing it
and reading it back. Where the artifact lives: ``layout.py``; checking it before a restore:
``verification.py``.

The version directory holds CRIU's images and ``dump.log``, ``rootfs-diff.tar``,
``deleted-files.json``, ``dev-shm.tar`` and ``manifest.json``. The manifest is written last and lists
every other file with its size and SHA-256: no manifest, no checkpoint. A restore verifies all of it
(and that nothing else is there) before it touches the placeholder.

Files larger than ``DIGEST_CHUNK`` carry one SHA-256 per chunk (``chunkBytes``, ``chunkSha256``)
instead of one for the whole file, so both sides hash with every core: a GPU worker's page image
is one file of many GiB, and a single SHA-256 stream over it (about 2 GB/s) would cost more than
reading it. Verification reads every byte with ``io_threads`` readers in parallel, which also brings
the image into the page cache ahead of CRIU's sequential reads (the restore's prefetch). At the
checkpoint, the page images' chunks are hashed while CRIU writes them (``following.py``); the manifest
takes those digests (``Hashed``) for a file still of the size and inode they were computed for.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import platform
import re
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dynamo_snapshot.agent.artifact.layout import MANIFEST
from dynamo_snapshot.agent.cuda.devices import recorded_gpus
from dynamo_snapshot.agent.errors import ArtifactIncompatible, ArtifactInvalid, ArtifactMissing, CheckpointError

MANIFEST_FORMAT = 1
_CHUNK = 4 << 20
DIGEST_CHUNK = 64 << 20  # files above this get one digest per chunk; chunks are hashed in parallel

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
    # never a link, never a FIFO or device swapped in after the listing was checked (it would block or lie)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactInvalid(f"{path} is not a regular file; an artifact holds regular files only")
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


def chunk_ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(chunk, size - start)) for start in range(0, size, chunk)] or [(0, 0)]


def hash_chunks(jobs: list[tuple[Path, int, int]], threads: int) -> list[str]:
    """Digest (path, offset, length) jobs with ``threads`` readers, results in job order."""
    if threads <= 1 or len(jobs) <= 1:
        return [sha256_range(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="digest") as pool:
        return list(pool.map(lambda job: sha256_range(*job), jobs))


@dataclass(frozen=True)
class Hashed:
    """A file's digests computed before the manifest stage (``following.py``: while CRIU wrote it), and
    the file they were computed for: they stand only for a file of this size and inode."""

    size: int
    inode: int
    chunk_bytes: int
    digests: tuple[str, ...]  # one per chunk_ranges(size, chunk_bytes); one for the whole of a small file

    def stands_for(self, st: os.stat_result, chunk_bytes: int) -> bool:
        return (st.st_size, st.st_ino, self.chunk_bytes) == (self.size, self.inode, chunk_bytes) and len(
            self.digests) == len(chunk_ranges(self.size, chunk_bytes))


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
    staging: Path, fields: dict[str, Any], io_threads: int | None = None, chunk_bytes: int = DIGEST_CHUNK,
    hashed: Mapping[str, Hashed] | None = None,
) -> dict[str, Any]:
    """Digest every file in ``staging`` (``digest_files``) and write ``manifest.json`` last, atomically."""
    files = digest_files(staging, io_threads, chunk_bytes, hashed)
    manifest = {"formatVersion": MANIFEST_FORMAT, **fields, "files": files}
    tmp = staging / f".{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / MANIFEST)
    return manifest


def digest_files(
    staging: Path, io_threads: int | None = None, chunk_bytes: int = DIGEST_CHUNK,
    hashed: Mapping[str, Hashed] | None = None,
) -> list[dict[str, Any]]:
    """The manifest's file listing of ``staging``: every file fsynced, then hashed in parallel.
    ``hashed``: digests computed earlier, by relative path; taken for a file only if they stand for it
    as it is now (``Hashed.stands_for``), the file is hashed otherwise."""
    threads = io_threads or default_io_threads()
    paths: list[tuple[str, Path, os.stat_result]] = []
    for path in sorted(p for p in staging.rglob("*") if not p.is_dir()):
        rel = path.relative_to(staging).as_posix()
        if rel == MANIFEST or rel.startswith(f".{MANIFEST}"):
            continue
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path} is not a regular file; an artifact holds regular files only")
        paths.append((rel, path, path.stat()))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fsync") as pool:
        list(pool.map(_fsync_file, [path for _, path, _ in paths]))
    early = {rel: hashed[rel].digests for rel, _, st in paths
             if hashed and rel in hashed and hashed[rel].stands_for(st, chunk_bytes)}
    jobs: list[tuple[Path, int, int]] = []
    for rel, path, st in paths:
        if rel not in early:
            jobs += [(path, start, length) for start, length in chunk_ranges(st.st_size, chunk_bytes)]
    digests = iter(hash_chunks(jobs, threads))
    files = []
    for rel, _, st in paths:
        size = st.st_size
        chunks = list(early[rel]) if rel in early else [next(digests) for _ in chunk_ranges(size, chunk_bytes)]
        if size > chunk_bytes:
            files.append({"path": rel, "size": size, "chunkBytes": chunk_bytes, "chunkSha256": chunks})
        else:
            files.append({"path": rel, "size": size, "sha256": chunks[0]})
    return files


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactMissing(f"{path} is missing: the checkpoint was never completed") from None
    except (OSError, ValueError) as exc:
        raise ArtifactInvalid(f"{path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactInvalid(f"{path} is not a JSON object")
    return manifest


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
