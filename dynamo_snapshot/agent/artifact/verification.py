"""Checking a checkpoint artifact before anything is restored from it, in two passes:

    verify_listing   manifest format, checkpoint ID, compatibility, every listed file present with its
                     size, nothing unlisted (cheap; before any byte is trusted)
    verify_digests   the SHA-256 of every byte the selector picks, ``io_threads`` readers in parallel:
                     first what CRIU and the agent parse (``is_parsed``), then, possibly while CRIU
                     runs, the raw page data (``is_page_data``; a restore checks it in memory: ``memcheck.py``)

A check that must pass before the manifest is parsed belongs before ``read_manifest`` in
``verify_listing``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from dynamo_snapshot.agent.artifact import fields as manifest_fields
from dynamo_snapshot.agent.artifact.layout import MANIFEST
from dynamo_snapshot.agent.artifact.manifest import (
    MANIFEST_FORMAT,
    Compatibility,
    check_compatible,
    chunk_ranges,
    default_io_threads,
    hash_chunks,
    read_manifest,
)
from dynamo_snapshot.agent.errors import ArtifactInvalid
from dynamo_snapshot.api import names

_SIDECARS = (MANIFEST, names.MANIFEST_MAC_FILE)  # beside the files the manifest lists

log = structlog.get_logger(__name__)


def verify(
    directory: Path, checkpoint_id: str, here: Compatibility, io_threads: int | None = None
) -> dict[str, Any]:
    """Check the artifact before anything is restored from it; returns the manifest.

    Refuses: a missing or unreadable manifest, another checkpoint ID, an incompatible node, a
    missing, resized or altered file, and any file the manifest does not list."""
    manifest = verify_listing(directory, checkpoint_id, here)
    verify_digests(directory, manifest, io_threads=io_threads)
    return manifest


def verify_listing(
    directory: Path, checkpoint_id: str, here: Compatibility, manifest: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every check of ``verify`` but the digests: manifest, checkpoint ID, compatibility, every listed
    file present with its size, nothing unlisted. Returns the manifest (``manifest``, the one
    ``authn.open_manifest`` authenticated, when given)."""
    manifest = read_manifest(directory) if manifest is None else manifest
    check_manifest(manifest, checkpoint_id, here, str(directory))
    listed: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("files") or []:
        rel = str(entry.get("path", ""))
        if not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise ArtifactInvalid(f"{directory / MANIFEST} lists an unsafe path {rel!r}")
        listed[rel] = entry
    present = {
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir() and p.name not in _SIDECARS
    }
    if extra := sorted(present - set(listed)):
        raise ArtifactInvalid(f"{directory} holds files the manifest does not list: {', '.join(extra[:5])}")
    for rel, entry in sorted(listed.items()):
        path = directory / rel
        if path.is_symlink():
            raise ArtifactInvalid(f"{path} is a symbolic link; an artifact holds regular files only")
        if not path.is_file():
            raise ArtifactInvalid(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise ArtifactInvalid(f"{path} is {size} bytes; the manifest says {entry.get('size')}")
    return manifest


def check_manifest(manifest: dict[str, Any], checkpoint_id: str, here: Compatibility, where: str) -> None:
    """The checks of ``verify_listing`` that need only the manifest: its fields and format, the checkpoint
    ID, and compatibility with this node. ``where`` names the version (a directory or an object prefix)."""
    manifest_fields.check(manifest, f"{where}/{MANIFEST}")
    if manifest.get("formatVersion") != MANIFEST_FORMAT:
        raise ArtifactInvalid(
            f"{where}/{MANIFEST} has format version {manifest.get('formatVersion')!r}; "
            f"this agent reads version {MANIFEST_FORMAT}"
        )
    if manifest.get("checkpointID") != checkpoint_id:
        raise ArtifactInvalid(
            f"{where} holds checkpoint {manifest.get('checkpointID')!r}, not the requested {checkpoint_id!r}"
        )
    try:
        recorded = Compatibility.from_json(manifest["compatibility"])
    except (KeyError, TypeError) as exc:
        raise ArtifactInvalid(f"{where}/{MANIFEST} has no usable compatibility record ({exc})") from exc
    for warning in check_compatible(recorded, here):
        log.warning("restoring across a difference", checkpoint_id=checkpoint_id, difference=warning)


def check_namespace(manifest: dict[str, Any], namespace: str, where: str) -> None:
    """A checkpoint restores only into a pod of the namespace it was taken in: its manifest records that
    namespace (authenticated with the rest). One without it (taken before it was recorded, or of a host
    tree) and a restore without a namespace (a host tree) are not checked."""
    taken = (manifest.get("workload") or {}).get("namespace")
    if namespace and taken and taken != namespace:
        raise ArtifactInvalid(
            f"{where} was checkpointed in namespace {taken!r}: a pod of namespace {namespace!r} cannot restore it "
            "(a checkpoint belongs to its namespace; checkpoint the workload in this namespace instead)")


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
            ranges = chunk_ranges(size, int(chunk)) if isinstance(chunk, int) and chunk > 0 else []
            if not ranges or len(digests) != len(ranges):
                raise ArtifactInvalid(f"{directory / MANIFEST} has a malformed chunk list for {rel}")
            for (start, length), digest in zip(ranges, digests, strict=True):
                jobs.append((path, start, length))
                expected.append((rel, start, length, size, str(digest)))
        else:
            jobs.append((path, 0, size))
            expected.append((rel, 0, size, size, str(entry.get("sha256"))))
    digests = hash_chunks(jobs, io_threads or default_io_threads())
    for (rel, start, length, size, want), got in zip(expected, digests, strict=True):
        if got != want:
            where = f" in bytes {start}-{start + length}" if length != size else ""
            raise ArtifactInvalid(f"{directory / rel} has SHA-256 {got}{where}; the manifest says {want}")
