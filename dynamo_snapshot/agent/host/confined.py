"""Opening files below a directory that is not trusted, with ``openat2(2)``: a container's files for
reading from the host without leaving the container's root, checkpoint directories without symlinks.

``/proc/<pid>/root/<path>`` follows the container's absolute symlinks to the *host's* files, and
``..`` can climb out of it. ``openat2(2)`` with ``RESOLVE_IN_ROOT`` resolves every component - symlinks
and ``..`` included - as if the given directory were ``/``, in the kernel and without races, so a
container path can be opened from the agent's own threads (the prefetch readers) with no helper
process. Only regular files are handed out; FIFOs and devices are opened non-blocking and dropped.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# openat2(2): <linux/openat2.h>
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall tables were unified)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
BENEATH_NO_LINKS = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_READ_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK  # non-blocking: a FIFO must not hang a reader

MAX_DEPTH = 16  # directories below a named directory that are walked
MAX_FILES = 10_000  # files one expansion hands out


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def openat2(dir_fd: int, path: str, resolve: int, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """``openat2(2)`` with the ``RESOLVE_*`` flags ``resolve`` (close-on-exec); raises OSError."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    while True:
        fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:  # EAGAIN: a rename raced the lookup; the kernel asks to try again
            raise OSError(err, os.strerror(err), path)


def open_in_root(root_fd: int, path: str, flags: int = _READ_FLAGS) -> int:
    """Open ``path`` (absolute or relative, as seen inside the root) below the directory ``root_fd``,
    every component - symlinks and ``..`` included - resolved inside it."""
    return openat2(root_fd, path.lstrip("/") or ".", RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, flags)


@dataclass(frozen=True)
class OpenFile:
    path: str  # as named inside the root
    fd: int
    size: int


def regular_files(root_fd: int, paths: Iterable[str], errors: list[str]) -> Iterator[OpenFile]:
    """Open the regular files ``paths`` name below ``root_fd``; a directory stands for the regular
    files below it (sorted, symlinks followed inside the root, at most ``MAX_DEPTH`` levels). What
    cannot be opened is appended to ``errors``; the caller closes the descriptors it gets."""
    handed_out = 0
    todo: list[tuple[str, int]] = [(str(p), 0) for p in reversed(list(paths))]
    while todo:
        path, depth = todo.pop()
        try:
            fd = open_in_root(root_fd, path)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            if handed_out >= MAX_FILES:
                os.close(fd)
                errors.append(f"{path}: more than {MAX_FILES} files named; the rest is not read")
                return
            handed_out += 1
            yield OpenFile(path, fd, os.fstat(fd).st_size)
        elif stat.S_ISDIR(mode) and depth < MAX_DEPTH:
            try:
                names = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            todo.extend((f"{path.rstrip('/')}/{name}", depth + 1) for name in reversed(names))
        else:
            os.close(fd)


def open_below(root: os.PathLike | str, path: str, flags: int = _READ_FLAGS) -> int:
    """``open_in_root`` from the directory ``root`` names (``/proc/<pid>/root``, say)."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_in_root(root_fd, path, flags)
    finally:
        os.close(root_fd)


def read_small(root: os.PathLike | str, path: str, limit: int) -> bytes | None:
    """The content of the regular file ``path`` below ``root`` (at most ``limit`` bytes, or ValueError);
    None when it is not there. Read by the agent itself: nothing is executed, nothing written."""
    try:
        fd = open_below(root, path)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        content = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(content) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return content
