"""A restore's private copy of what CRIU and the agent parse, so that a writer of storage cannot swap a
verified image for another before it is read.

Storage is writable by others (every workload pod in podMount, anyone who can mount the PVC): a file
verified there could be replaced between the check and CRIU's read. So, after the manifest is
authenticated and the listing checked, each file CRIU or the agent parses (everything but the raw page
data) is copied - opened without following a link, a regular file of the listed size - into a directory
on the node that only the agent can reach, and its digest is checked on that copy: what was verified is
what is read, and the credential check reads the same copies.

The raw page data of each process (``pages-<n>.img`` named by a ``pagemap-<pid>.img``, most of the
bytes) is not copied: a relative link in the private directory names the stored file (up to the agent's
root, then its path there: it resolves the same from CRIU's restored tasks, which run in the
placeholder's mount namespace but open images through the directory's descriptor), and its digests are
checked where CRIU put it, in the restored memory, the tasks held stopped until they pass
(``memcheck.py``): whatever storage showed CRIU, what runs is what was signed. The page files of shared
memory (``layout.shared``: no one process holds them at one address) are copied and verified like the
parsed files. A restore from the node cache (``nodecache.py``) reads every file, the page data included,
from a complete copy verified when it was cached, and no private copy is made (docs/security.md). The
open/copy helpers are shared with the cache (``copies.py``).

    images = PrivateImages.prepare(version_dir, manifest, root)   # copies; digests of the copies
    images.path                                                     # for CRIU and the agent
    images.layout                                                   # where each page file lands
    images.close()                                                  # removes the copies
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dynamo_snapshot.agent.artifact import copies
from dynamo_snapshot.agent.artifact.manifest import default_io_threads
from dynamo_snapshot.agent.artifact.verification import is_page_data, verify_digests
from dynamo_snapshot.agent.container import memimages
from dynamo_snapshot.agent.errors import ArtifactInvalid

DEFAULT_ROOT = Path("/var/lib/dynamo-snapshot/restore")


def _from_root(link: Path, target: Path) -> str:
    """A relative link from ``link`` to the absolute ``target``: up to the root, then down. ``/proc/self``
    becomes this process's PID (the link is followed by CRIU's processes, for which "self" is another)."""
    absolute = str(target).replace("/proc/self/", f"/proc/{os.getpid()}/", 1)
    return "../" * (len(link.parent.parts) - 1) + absolute.lstrip("/")


class PrivateImages:
    def __init__(self, path: Path, storage_fd: int):
        self.path = path
        self._storage_fd = storage_fd
        self.layout = memimages.PageLayout((), frozenset())

    @classmethod
    def prepare(cls, version: Path, manifest: dict[str, Any], root: Path = DEFAULT_ROOT,
                io_threads: int | None = None) -> PrivateImages:
        """Copy and verify the parsed files of ``version`` (listing already checked) below ``root``."""
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        path = root / uuid.uuid4().hex
        path.mkdir(mode=0o700)
        storage_fd = os.open(version, copies.DIRECTORY)
        images = cls(path, storage_fd)
        try:
            images._fill(version, manifest, io_threads or default_io_threads())
        except BaseException:
            images.close()
            raise
        return images

    def _fill(self, version: Path, manifest: dict[str, Any], threads: int) -> None:
        files = {str(entry["path"]): int(entry["size"]) for entry in manifest.get("files") or []}
        for rel in files:
            (self.path / rel).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._copy(version, manifest, {rel: size for rel, size in files.items() if not is_page_data(rel)}, threads)
        try:
            self.layout = memimages.read_layout(self.path, [rel for rel in files if is_page_data(rel)])
        except (ValueError, OSError) as exc:
            raise ArtifactInvalid(f"{version}: {exc}".replace(str(self.path), str(version))) from None
        shared = {rel: size for rel, size in files.items() if rel in self.layout.shared}
        self._copy(version, manifest, shared, threads)
        for rel in files:
            if is_page_data(rel) and rel not in shared:
                os.close(copies.open_regular(self._storage_fd, rel, version))  # a regular file, now
                os.symlink(_from_root(self.path / rel, version / rel), self.path / rel)

    def _copy(self, version: Path, manifest: dict[str, Any], files: dict[str, int], threads: int) -> None:
        """Copy ``files`` (path -> size) from storage, then check their digests on the copies."""
        def copy(job: tuple[str, int]) -> None:
            rel, size = job
            src = copies.open_regular(self._storage_fd, rel, version)
            try:
                copies.copy_exact(src, self.path / rel, size, version / rel)
            finally:
                os.close(src)

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="private-copy") as pool:
            list(pool.map(copy, files.items()))
        try:
            verify_digests(self.path, manifest, lambda rel: rel in files, threads)
        except ArtifactInvalid as exc:  # name the stored file, not the private copy
            raise ArtifactInvalid(str(exc).replace(str(self.path), str(version))) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._storage_fd)
        shutil.rmtree(self.path, ignore_errors=True)


def sweep(root: Path = DEFAULT_ROOT) -> None:
    """Remove the copies an agent that died mid-restore left (at start-up, before any restore)."""
    if root.is_dir():
        for child in root.iterdir():
            shutil.rmtree(child, ignore_errors=True)
