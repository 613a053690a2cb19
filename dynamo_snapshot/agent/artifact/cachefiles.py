"""The node cache's files (``nodecache.py`` keeps the budget, the pins and the index): what an entry is on
disk, and how one version is written into a temporary directory.

    write     every listed file opened below the stored version without following a link, a regular
              file of its listed size (``copies.py``), copied and synced; ``manifest.json`` and its MAC;
              every digest verified on the copy; the manifest's bytes checked against the authenticated
              SHA-256; the completion record (``COMPLETE``) written and synced last, then the directory
              (``complete``; a fill from object storage writes the files itself: ``artifact/remote.py``)
    read      an entry's completion record, or None for anything that is not a valid one
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dynamo_snapshot.agent.artifact import authn, copies
from dynamo_snapshot.agent.artifact.verification import verify_digests
from dynamo_snapshot.agent.errors import AgentError, ArtifactInvalid

RECORD = "COMPLETE"
PARTIAL = ".partial"
SIDECARS = ((authn.MANIFEST, authn.MAX_MANIFEST_BYTES), (authn.MAC_FILE, authn.MAX_MAC_BYTES))
_HEX = re.compile(r"^[0-9a-f]{64}$")


class Stopping(AgentError):
    """The agent is stopping: a fill under way gives up at its next file."""


def listed_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(entry["size"]) for entry in manifest.get("files") or [])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, copies.DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not _HEX.match(str(record.get("manifestSha256"))):
        return None
    if record.get("checkpointID") != path.parent.name or record.get("version") != path.name:
        return None
    return record if isinstance(record.get("bytes"), int) else None


def write_version(tmp: Path, dir_fd: int, where: Path, manifest: dict[str, Any],
                  sidecars: list[tuple[str, int, int]], sizes: dict[str, int], record: dict[str, Any], *,
                  io_threads: int, stopping: threading.Event) -> None:
    """Fill ``tmp`` with the version below ``dir_fd`` (``where`` names it in errors) and complete it."""
    _copy_files(tmp, dir_fd, where, manifest, io_threads, stopping)
    for name, fd, _ in sidecars:
        copies.copy_exact(fd, tmp / name, sizes[name], where / name, sync=True)
    try:
        verify_digests(tmp, manifest, io_threads=io_threads)
    except ArtifactInvalid as exc:  # name the stored file, not the copy
        raise ArtifactInvalid(str(exc).replace(str(tmp), str(where))) from None
    if hashlib.sha256((tmp / authn.MANIFEST).read_bytes()).hexdigest() != record["manifestSha256"]:
        raise ArtifactInvalid(f"{where / authn.MANIFEST} changed since the restore authenticated it; "
                              "nothing is cached from it")
    complete(tmp, record)


def write_sidecar(tmp: Path, name: str, data: bytes) -> None:
    """``manifest.json`` or its MAC, as authenticated, written and synced into the entry ``tmp``."""
    fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def complete(tmp: Path, record: dict[str, Any]) -> None:
    """The completion record, written and synced last, then the directory: only now is ``tmp`` an entry."""
    fd = os.open(tmp / RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(record))
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(tmp)


def _copy_files(tmp: Path, dir_fd: int, where: Path, manifest: dict[str, Any], io_threads: int,
                stopping: threading.Event) -> None:
    jobs = [(str(e["path"]), int(e["size"])) for e in manifest.get("files") or []]
    for rel, _ in jobs:
        (tmp / rel).parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def copy(job: tuple[str, int]) -> None:
        if stopping.is_set():
            raise Stopping(f"the agent is stopping; nothing was cached from {where}")
        rel, size = job
        src = copies.open_regular(dir_fd, rel, where)
        try:
            copies.copy_exact(src, tmp / rel, size, where / rel, sync=True)
        finally:
            os.close(src)

    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="node-cache-copy") as pool:
        list(pool.map(copy, jobs))
