"""Who writes to the files of a directory, as the kernel saw it (fanotify), and asking the kernel to
start writing a file's dirty pages back (``sync_file_range``). Used by the checkpoint's dump stage to
digest CRIU's page images while CRIU writes them (``artifact/following.py``).

    WriteWatch.open     a fanotify group marking FAN_MODIFY and FAN_CLOSE_WRITE on every file directly
                        in a directory (needs CAP_SYS_ADMIN; ``WatchUnavailable`` otherwise)
    WriteWatch.read     the writes queued so far, without blocking: (name, PID of the writer, size and
                        inode of the file after the write); an overflowed queue is reported, not hidden
    open_for_writing    whether anything has the file open for writing (a descriptor or a shared
                        writable mapping): a read lease is refused then
    start_writeback     SYNC_FILE_RANGE_WRITE on a range: the disk starts on it now, not at fsync

fsnotify queues a write's event in the write system call itself, after the data is in the file:
once a writer has exited, every event of its writes can be read. A store through a shared mapping
raises no event; the process behind it opened the file for writing, which its close reports
(FAN_CLOSE_WRITE, with its PID) or, while it still holds it, ``open_for_writing`` sees.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from dynamo_snapshot.agent.errors import AgentError

_FAN_CLOEXEC, _FAN_NONBLOCK, _FAN_UNLIMITED_QUEUE = 0x1, 0x2, 0x10
_FAN_MARK_ADD = 0x1
_FAN_MODIFY, _FAN_CLOSE_WRITE, _FAN_Q_OVERFLOW, _FAN_EVENT_ON_CHILD = 0x2, 0x8, 0x4000, 0x08000000
_FAN_NOFD = -1
_EVENT = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_SYNC_FILE_RANGE_WRITE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


class WatchUnavailable(OSError, AgentError):
    """The kernel refused the watch (errno and the call that failed): the caller does without it."""


@dataclass(frozen=True)
class Write:
    """One write (or truncation) the kernel reported. ``name`` is None for an overflowed queue: writes
    were lost, nothing can be told of them."""

    name: str | None
    pid: int
    size: int = 0
    inode: int = 0


class WriteWatch:
    def __init__(self, fd: int, directory: Path):
        self.fd, self.directory = fd, directory

    @classmethod
    def open(cls, directory: Path) -> WriteWatch:
        fd = _libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_UNLIMITED_QUEUE,
                                 os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
        if fd < 0:
            err = ctypes.get_errno()
            raise WatchUnavailable(err, f"fanotify_init: {os.strerror(err)} (needs CAP_SYS_ADMIN)")
        mask = _FAN_MODIFY | _FAN_CLOSE_WRITE | _FAN_EVENT_ON_CHILD
        if _libc.fanotify_mark(fd, _FAN_MARK_ADD, mask, _AT_FDCWD, os.fsencode(directory)) != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise WatchUnavailable(err, f"fanotify_mark {directory}: {os.strerror(err)}")
        return cls(fd, Path(os.path.realpath(directory)))

    def wait(self, timeout_s: float, wake_fd: int) -> None:
        """Until events are queued, ``wake_fd`` is readable, or ``timeout_s`` passed."""
        select.select([self.fd, wake_fd], [], [], timeout_s)

    def read(self) -> list[Write]:
        writes: list[Write] = []
        while True:
            try:
                buf = os.read(self.fd, 64 * _EVENT.size)
            except BlockingIOError:
                return writes
            offset = 0
            while offset + _EVENT.size <= len(buf):
                length, _, _, _, mask, fd, pid = _EVENT.unpack_from(buf, offset)
                offset += max(length, _EVENT.size)
                if mask & _FAN_Q_OVERFLOW or fd == _FAN_NOFD:
                    writes.append(Write(None, pid))
                    continue
                writes.append(self._described(fd, pid))

    def _described(self, fd: int, pid: int) -> Write:
        try:
            st = os.fstat(fd)
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        finally:
            os.close(fd)
        # a file elsewhere (or not a regular file) keeps its whole path: it matches no name of the directory
        name = target.name if target.parent == self.directory and stat.S_ISREG(st.st_mode) else str(target)
        return Write(name, pid, st.st_size, st.st_ino)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_for_writing(path: Path) -> bool:
    """Whether any process has ``path`` open for writing, through a descriptor or a shared writable
    mapping (the kernel refuses a read lease then). Where leases are not supported (some network
    filesystems) the answer is True: nothing can be told."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # A writer opening it while the lease is held breaks it with a signal: one ignored by default
        # (SIGWINCH: no terminal here), not SIGIO, which would end the process.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGWINCH)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return True
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back the dirty pages of a range (returns before they are on disk; fsync waits)."""
    if _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")
