"""Exact copies of stored files, for the readers that must not trust storage after a check: the restore's
private copies (``private.py``) and the node-local cache (``nodecache.py``).

    open_regular   ``rel`` below a directory descriptor, each component opened without following a link,
                   refused unless a regular file (a FIFO swapped in does not hang the open)
    copy_exact     the first ``size`` bytes of an opened file into a new file (never over an existing
                   one), refused when the source is shorter; optionally synced to the disk

Neither checks a digest: the caller verifies the copy (``verification.verify_digests``), so what was
verified is what is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dynamo_snapshot.agent.errors import ArtifactInvalid

DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_regular(dir_fd: int, rel: str, where: Path) -> int:
    """``rel`` below ``dir_fd``, each component opened without following a link; a regular file.
    ``where`` is the directory's path, for messages."""
    parts = rel.split("/")
    fd = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, DIRECTORY, dir_fd=fd)
            except OSError as exc:
                raise ArtifactInvalid(f"{where / rel} cannot be reached without following a link: "
                                      f"{exc.strerror}") from None
            os.close(fd)
            fd = child
        try:
            # O_NONBLOCK: a FIFO swapped in must not hang the open (it is refused below as not regular)
            found = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise ArtifactInvalid(f"{where / rel} cannot be opened as a regular file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(found).st_mode):
        os.close(found)
        raise ArtifactInvalid(f"{where / rel} is not a regular file; an artifact holds regular files only")
    return found


def copy_exact(src: int, dest: Path, size: int, where: Path, sync: bool = False) -> None:
    """``size`` bytes of ``src`` into the new file ``dest`` (mode 0600); ArtifactInvalid naming ``where``
    (the source) when it ends early. ``sync``: the copy is on the disk when this returns."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < size:
            sent = os.sendfile(out, src, done, size - done)
            if sent == 0:
                raise ArtifactInvalid(f"{where} ends at byte {done}; the manifest says {size} bytes")
            done += sent
        if sync:
            os.fsync(out)
    finally:
        os.close(out)
