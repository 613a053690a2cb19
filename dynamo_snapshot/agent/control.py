"""The agent's side of the ``/snapshot-control`` contract (SPEC section 8): writing the signals into
a container's control directory, through the confined helper (the directory is container-owned)."""

from __future__ import annotations

import json
import os
from typing import Any

from dynamo_snapshot.agent import inroot, procfs
from dynamo_snapshot.agent.runtime import ContainerInfo
from dynamo_snapshot.api import names

CONTROL_DIR_ENV = names.ENV_CONTROL_DIR
RESTORE_STANDBY_ENV = names.ENV_RESTORE_STANDBY
SNAPSHOT_COMPLETE = names.FILE_SNAPSHOT_COMPLETE
RESTORE_COMPLETE = names.FILE_RESTORE_COMPLETE


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
