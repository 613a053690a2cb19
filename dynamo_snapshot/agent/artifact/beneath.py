"""Directories below the checkpoint base path, reached without following a symlink.

Storage is writable by every workload pod in podMount (and by whoever can write the PVC): a symlink
planted at ``<id>/restores``, ``<id>/failed`` or ``versions/<v>`` must not steer where the agent
writes, what it restores from, or what it deletes. Every directory the agent creates or removes
under storage is walked one component at a time from a descriptor of the base path, each opened with
``O_NOFOLLOW | O_DIRECTORY`` (a symlink or a non-directory is refused, naming it); removal goes through
descriptors too (``shutil.rmtree`` with ``dir_fd``), so it never leaves the directory it was given.
In podMount the base path is ``/proc/<pid>/root/<basePath>`` (or ``/proc/<agent>/fd/N``): only the
components below it are walked, so an absolute symlink can never resolve from the agent's own root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from dynamo_snapshot.agent.errors import CheckpointError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafePath(CheckpointError):
    """A component below the checkpoint base path is a symlink or not a directory."""


def _parts(base: Path, path: Path) -> list[str]:
    try:
        rel = path.relative_to(base)
    except ValueError:
        raise UnsafePath(f"{path} is not below the checkpoint base path {base}") from None
    parts = list(rel.parts)
    if any(p in ("..", ".", "") for p in parts):
        raise UnsafePath(f"{path} climbs out of the checkpoint base path {base}")
    return parts


def open_dir(base: Path, path: Path, create: bool = False) -> int:
    """A descriptor of the directory ``path`` below ``base``, no component a symlink (created if asked)."""
    fd = os.open(base, _DIR)
    walked = base
    try:
        for part in _parts(base, path):
            walked = walked / part
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    why = "is a symbolic link or not a directory; the agent does not follow it"
                    raise UnsafePath(f"{walked} {why}") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def directory(base: Path, path: Path, create: bool = False) -> Iterator[int]:
    fd = open_dir(base, path, create)
    try:
        yield fd
    finally:
        os.close(fd)


def make_dirs(base: Path, path: Path) -> Path:
    """Create ``path`` below ``base`` (and its parents), refusing a symlink on the way; returns it."""
    os.close(open_dir(base, path, create=True))
    return path


def remove_children(base: Path, parent: Path, names: list[str]) -> None:
    """Remove the directories ``names`` of ``parent`` (below ``base``) and everything in them, through
    descriptors only: a symlink among them is unlinked, never followed."""
    if not names:
        return
    with directory(base, parent) as fd:
        for name in names:
            if "/" in name or name in (".", ".."):
                raise UnsafePath(f"{name!r} is not one directory entry")
            try:
                if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass


def scan_dirs(base: Path, parent: Path) -> list[tuple[str, float]]:
    """(name, mtime) of the real directories in ``parent`` below ``base`` (symlinks left out); [] when
    ``parent`` does not exist."""
    try:
        fd = open_dir(base, parent)
    except FileNotFoundError:
        return []
    try:
        with os.scandir(fd) as entries:
            dirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
            return [(e.name, e.stat(follow_symlinks=False).st_mtime) for e in dirs]
    finally:
        os.close(fd)
