"""File work inside a container's root, confined by chroot(2) (run as a separate process).

The agent is root on the host; a container's files are not trusted. Resolving a container path from
the host (``/proc/<pid>/root/x``) follows the container's absolute symlinks to the *host's* files,
so every read or write of container files goes through this helper instead: it imports everything
it needs, chroots into ``/proc/<pid>/root`` (whose mounts are the container's), shuts the import
system so nothing from the container's filesystem can be loaded, and then touches files.

    python -m dynamo_snapshot.agent.host.inroot --root /proc/<pid>/root extract --archive-fd N [--deleted-fd M]
                                                     [--skip P]... [--within P]
    python -m dynamo_snapshot.agent.host.inroot --root /proc/<pid>/root archive --source /dev/shm --archive-fd N
    python -m dynamo_snapshot.agent.host.inroot --root /proc/<pid>/root write --path P --content-fd N

``run`` is the agent-side wrapper.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Sequence

import anyio

from dynamo_snapshot.agent.errors import AgentError


class InRootError(AgentError):
    pass


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _confine(root: str) -> None:
    os.chroot(root)
    os.chdir("/")
    # Nothing may be imported from the container from here on.
    sys.path.clear()
    sys.path_hooks.clear()
    sys.path_importer_cache.clear()
    sys.meta_path[:] = [importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter]


def _delete(paths: list[str], skip: Sequence[str]) -> None:
    for rel in paths:
        path = "/" + str(rel).lstrip("/")
        if path == "/" or _under(path, skip) or ".." in path.split("/"):
            continue
        if not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _extract(archive_fd: int, skip: Sequence[str], within: str) -> int:
    extracted = 0

    def keep(member: tarfile.TarInfo) -> bool:
        path = "/" + member.name.lstrip("/")
        # outside what this archive may touch, or a device node a container should not carry
        return not (".." in path.split("/") or _under(path, skip) or not _under(path, [within]) or member.isdev())

    # Members are vetted here, one by one: extraction filters (``filter=``) only exist from Python 3.11.4
    # on, and Debian bookworm's python3 is 3.11.2. Where they exist, the vetted member goes in as is.
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    with os.fdopen(archive_fd, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if keep(member):
                tar.extract(member, "/", numeric_owner=True, **trusted)
                extracted += 1
    return extracted


def _archive(source: str, archive_fd: int) -> None:
    with (
        os.fdopen(archive_fd, "wb") as stream,
        tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            tar.add(path, arcname=path.lstrip("/"), recursive=True)


def _write(path: str, content: bytes) -> None:
    directory, name = os.path.split(path)
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise InRootError(f"{directory} is not a directory in the container")
    tmp = os.path.join(directory, f".{name}.agent.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inroot")
    parser.add_argument("--root", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    p_extract = sub.add_parser("extract")
    p_extract.add_argument("--archive-fd", type=int)
    p_extract.add_argument("--deleted-fd", type=int)
    p_extract.add_argument("--skip", action="append", default=[], help="leave paths at or below this alone")
    p_extract.add_argument("--within", default="/", help="extract only members at or below this path")
    p_archive = sub.add_parser("archive")
    p_archive.add_argument("--source", required=True)
    p_archive.add_argument("--archive-fd", type=int, required=True)
    p_write = sub.add_parser("write")
    p_write.add_argument("--path", required=True)
    p_write.add_argument("--content-fd", type=int, required=True)
    args = parser.parse_args(argv)

    # Everything read from the host happens before the chroot.
    deleted: list[str] = []
    if args.command == "extract" and args.deleted_fd is not None:
        with os.fdopen(args.deleted_fd, "rb") as f:
            deleted = json.loads(f.read() or b"[]")
        if not isinstance(deleted, list):
            raise InRootError("the deleted-files list is not a JSON array")
    content = b""
    if args.command == "write":
        with os.fdopen(args.content_fd, "rb") as f:
            content = f.read()

    _confine(args.root)
    if args.command == "extract":
        _delete(deleted, args.skip)
        if args.archive_fd is not None:
            _extract(args.archive_fd, args.skip, args.within)
    elif args.command == "archive":
        if not stat.S_ISDIR(os.lstat(args.source).st_mode):
            raise InRootError(f"{args.source} is not a directory in the container")
        _archive(args.source, args.archive_fd)
    elif args.command == "write":
        _write(args.path, content)
    return 0


async def run(root: str, command: list[str], fds: dict[str, int]) -> None:
    """Run one helper command against ``root``; ``fds`` maps option names (``--archive-fd``) to
    open descriptors passed to the helper."""
    argv = [sys.executable, "-m", "dynamo_snapshot.agent.host.inroot", "--root", root, *command]
    for option, fd in fds.items():
        argv += [option, str(fd)]
    result = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL, pass_fds=list(fds.values()))
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise InRootError(f"{command[0]} in {root} failed ({result.returncode}): {' | '.join(detail)}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, InRootError, tarfile.TarError, ValueError) as exc:
        print(f"inroot: {exc}", file=sys.stderr)
        sys.exit(1)
