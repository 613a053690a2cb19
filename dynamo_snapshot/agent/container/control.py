"""The agent's side of the ``/snapshot-control`` contract (SPEC section 8): writing the signals into
a container's control directory through the confined helper, reading them with ``confined`` (the
directory is container-owned)."""

from __future__ import annotations

import json
import os
from typing import Any

import anyio

from dynamo_snapshot.agent.container.runtime import ContainerInfo
from dynamo_snapshot.agent.host import confined, inroot, procfs
from dynamo_snapshot.api import names

CONTROL_DIR_ENV = names.ENV_CONTROL_DIR
RESTORE_STANDBY_ENV = names.ENV_RESTORE_STANDBY
SNAPSHOT_COMPLETE = names.FILE_SNAPSHOT_COMPLETE
RESTORE_COMPLETE = names.FILE_RESTORE_COMPLETE
RESTORE_FAILED = names.FILE_RESTORE_FAILED


def control_dir(info: ContainerInfo) -> str | None:
    value = info.env.get(CONTROL_DIR_ENV, "").strip()
    return value or None


def in_standby(info: ContainerInfo) -> bool:
    return info.env.get(RESTORE_STANDBY_ENV, "").strip().lower() in ("1", "true", "yes")


async def signal_container(info: ContainerInfo, name: str, payload: dict[str, Any]) -> None:
    """Atomically write ``name`` with a JSON payload into the container's control directory."""
    directory = control_dir(info)
    if directory is None:
        raise ValueError(f"container {info.name} ({info.id}) has no {CONTROL_DIR_ENV}; cannot signal {name}")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, (json.dumps(payload, sort_keys=True) + "\n").encode())
    finally:
        os.close(write_fd)
    try:
        await inroot.run(
            str(procfs.proc(info.pid) / "root"),
            ["write", "--path", f"{directory.rstrip('/')}/{name}"],
            {"--content-fd": read_fd},
        )
    finally:
        os.close(read_fd)


READY_FOR_SNAPSHOT = names.FILE_READY_FOR_SNAPSHOT
REREAD_FIELD = names.FIELD_REREAD_AFTER_RESTORE
MAX_REREAD_PATHS = names.MAX_REREAD_PATHS


def parse_reread_declaration(content: bytes, where: str) -> list[str]:
    """The files a worker declared in ``ready-for-snapshot`` for the agent to prefetch on a restore.

    Content that is not a JSON object declares nothing (a worker may write anything there); a
    declaration that is present must be a list of absolute paths, or the checkpoint is refused before
    anything is touched."""
    try:
        document = json.loads(content or b"null")
    except ValueError:
        return []
    if not isinstance(document, dict) or REREAD_FIELD not in document:
        return []
    declared = document[REREAD_FIELD]
    fix = "write it with dynamo_snapshot.workload.mark_ready_for_snapshot(reread_after_restore=[...])"
    if not isinstance(declared, list):
        raise ValueError(
            f"{where}: {REREAD_FIELD} must be a list of absolute paths, not {type(declared).__name__}; {fix}"
        )
    if len(declared) > MAX_REREAD_PATHS:
        raise ValueError(
            f"{where}: {REREAD_FIELD} names {len(declared)} paths, at most {MAX_REREAD_PATHS}; "
            "name the directory that holds them instead"
        )
    for index, path in enumerate(declared):
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 4096:
            raise ValueError(f"{where}: {REREAD_FIELD}[{index}] = {path!r} is not an absolute path; {fix}")
    return list(declared)


async def read_signal(info: ContainerInfo, name: str) -> bytes | None:
    """A signal file's content in the container's control directory (read confined to the container's
    root; see ``confined``); None when it is not there or the container has no control directory."""
    directory = control_dir(info)
    if directory is None:
        return None
    root, path = procfs.proc(info.pid) / "root", f"{directory.rstrip('/')}/{name}"
    return await anyio.to_thread.run_sync(confined.read_small, root, path, 1 << 20)


async def read_reread_declaration(info: ContainerInfo) -> list[str]:
    """The container's declaration (see ``parse_reread_declaration``); [] without one."""
    content = await read_signal(info, READY_FOR_SNAPSHOT)
    if content is None:  # a guide-era worker: its ready-for-checkpoint declares nothing more
        return []
    where = f"container {info.name}: {control_dir(info)}/{READY_FOR_SNAPSHOT}"
    return parse_reread_declaration(content, where)
