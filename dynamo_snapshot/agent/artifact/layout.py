"""The checkpoint artifact's place on storage (SPEC section 6): its directories, the one-rename
promotion, taking a promoted version back, discarding a failed attempt, pruning old restore logs.

    <base>/<checkpointID>/versions/tmp/<uuid>/        staging, written by one checkpoint run
    <base>/<checkpointID>/versions/<artifactVersion>/  promoted by a single rename(2)
    <base>/<checkpointID>/restores/<attempt>/          CRIU's restore.log and pidfile, one per restore

The version directory holds CRIU's images and ``dump.log``, ``rootfs-diff.tar``,
``deleted-files.json``, ``dev-shm.tar`` and ``manifest.json`` (``manifest.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dynamo_snapshot.agent.artifact import beneath
from dynamo_snapshot.agent.errors import CheckpointError
from dynamo_snapshot.api import names

MANIFEST = names.MANIFEST_FILE
DUMP_LOG = names.DUMP_LOG_FILE
DELETED_FILES = names.DELETED_FILES_FILE
ROOTFS_DIFF = "rootfs-diff.tar"
DEV_SHM = "dev-shm.tar"
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

    def withdraw_unconfirmed(self) -> bool:
        """Take out a version left by an earlier attempt that never got its verdict (its agent was killed
        between the promotion and the confirmation). Called only by an attempt that holds the checkpoint's
        Lease for a Job without a verdict: nothing vouches for that version, so a fresh one replaces it."""
        if not self.final_dir.exists():
            return False
        withdraw(self.final_dir)
        return True

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


def discard_staging(staging: Path, keep_log_at: Path | None = None) -> None:
    """Remove a failed attempt's staging directory, keeping its dump log for the post-mortem."""
    if keep_log_at is not None and (staging / DUMP_LOG).is_file():
        beneath.make_dirs(keep_log_at.parents[3], keep_log_at.parent)  # <base>/<id>/failed/<attempt>, no link
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
    through a symlink: ``<id>/restores`` and what is in it are reached by descriptors from the base
    path (``beneath``). Returns the names removed."""
    base = restores.parent.parent
    aged = sorted(beneath.scan_dirs(base, restores), key=lambda t: t[1], reverse=True)
    now = time.time() if now is None else now
    removed = [name for name, mtime in aged[keep:] if now - mtime >= min_age_s]
    beneath.remove_children(base, restores, removed)
    return removed
