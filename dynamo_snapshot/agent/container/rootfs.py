"""The container's root filesystem changes: captured from the overlay upper directory at checkpoint.

``rootfs-diff.tar`` holds everything the container wrote (files, directories, links, ownership and
modes) except mount points and what is below them, which belong to volumes, not to the image.
``deleted-files.json`` is a JSON array of root-relative paths the container removed: overlay
whiteouts (0:0 character devices), plus every opaque directory, whose lower content the container
replaced (the tar brings the new content back). Restore deletes first, then extracts.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

from dynamo_snapshot.agent.errors import CheckpointError
from dynamo_snapshot.agent.host import procfs

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")


def overlay_upper_dir(pid: int) -> Path:
    """The upper directory of the overlay mounted at the root of ``pid``'s mount namespace."""
    for mount in procfs.mountinfo(pid):
        if mount.mountpoint == "/":
            if mount.fstype != "overlay":
                raise CheckpointError(f"the root of process {pid} is {mount.fstype}, not overlay; no rootfs diff")
            upper = mount.super_option("upperdir")
            if not upper:
                raise CheckpointError(f"the root overlay of process {pid} has no upperdir")
            path = procfs.host_path(upper, pid)
            if not path.is_dir():
                raise CheckpointError(f"overlay upperdir {path} of process {pid} is not visible to the agent")
            return path
    raise CheckpointError(f"process {pid} has no root mount in its mountinfo")


def _has_xattr(path: str, names: tuple[str, ...], value: bytes | None = None) -> bool:
    for name in names:
        try:
            found = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        if value is None or found == value:
            return True
    return False


def _is_whiteout(path: str, st: os.stat_result) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and _has_xattr(path, _WHITEOUT_XATTRS)


def _excluded(rel: str, mountpoints: set[str]) -> bool:
    path = "/" + rel
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mountpoints)


def capture(upper: Path, mountpoints: set[str], diff_tar: Path, deleted_json: Path) -> tuple[int, int]:
    """Write the diff and the deletion list; returns (entries archived, paths deleted)."""
    mountpoints = {m for m in mountpoints if m != "/"}
    deleted: list[str] = []
    archived = 0
    with tarfile.open(diff_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            rel_dir = os.path.relpath(dirpath, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            keep_dirs = []
            for name in sorted(dirnames) + sorted(filenames):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                full = os.path.join(dirpath, name)
                if _excluded(rel, mountpoints):
                    continue
                st = os.lstat(full)
                if _is_whiteout(full, st):
                    deleted.append(rel)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    keep_dirs.append(name)
                    if _has_xattr(full, _OPAQUE_XATTRS, b"y"):
                        deleted.append(rel)
                tar.add(full, arcname=rel, recursive=False)
                archived += 1
            dirnames[:] = [d for d in dirnames if d in keep_dirs]
    deleted_json.write_text(json.dumps(sorted(deleted)) + "\n")
    return archived, len(deleted)
