"""Where checkpoint storage may lead: podMount paths stay inside the container root, symlinks are
refused, a restarted container is caught."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent.artifact.storage import (
    StorageError,
    StorageMode,
    StorageResolver,
    check_beneath,
    open_in_root,
)
from dynamo_snapshot.agent.container.runtime import ContainerInfo

ID = "abc123"


def test_a_path_inside_a_container_root_cannot_lead_out_of_it(tmp_path: Path):
    root = tmp_path / "rootfs"
    (root / "real").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "absolute").symlink_to("/")  # would be the host's / from the host
    (root / "dotdot").symlink_to("../../..")
    (root / "abs-out").symlink_to(str(tmp_path / "outside"))
    os.close(open_in_root(root, "/real"))
    # Resolved inside the root: "/" and "../../.." are the root itself, not the host's.
    for link in ("absolute", "dotdot"):
        fd = open_in_root(root, link)
        try:
            assert os.path.samefile(f"/proc/self/fd/{fd}", root)
        finally:
            os.close(fd)
    with pytest.raises(FileNotFoundError):  # the host path does not exist inside the root
        open_in_root(root, "abs-out")


def test_a_checkpoint_directory_that_is_a_symlink_is_refused(tmp_path: Path):
    base = tmp_path / "base"
    (base / ID).mkdir(parents=True)
    (base / ID / "versions").symlink_to(tmp_path)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(StorageError, match="versions"):
            check_beneath(fd, f"{ID}/versions/tmp")
        check_beneath(fd, "other-id/versions/tmp")  # not there yet: the pipeline creates it
    finally:
        os.close(fd)


class OneCRI:
    """A CRI that maps every container to given host PIDs, one per call."""

    def __init__(self, *pids: int):
        self.pids = list(pids)

    async def container_info(self, container_id: str) -> ContainerInfo:
        pid = self.pids.pop(0) if len(self.pids) > 1 else self.pids[0]
        return ContainerInfo(id=container_id, name="main", state="CONTAINER_RUNNING", pid=pid, sandbox_id="s",
                             image="i", exit_code=0, spec={})


@pytest.fixture
def other_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_pod_mount_storage_is_reached_through_the_container_root(tmp_path: Path, other_process: int):
    base = tmp_path / "checkpoints"  # inside the "container", whose root here is the host's /
    base.mkdir()

    async def resolve() -> Path:
        cri = OneCRI(other_process)
        resolver = StorageResolver(StorageMode.POD_MOUNT, "/unused", cri)  # type: ignore[arg-type]
        async with resolver.open(await cri.container_info("c1"), ID, str(base)) as path:
            (path / "probe").write_text("x")
            return path

    path = anyio.run(resolve)
    assert (base / "probe").read_text() == "x"
    assert str(path).startswith(f"/proc/{os.getpid()}/fd/")


def test_pod_mount_storage_is_refused_when_the_container_restarted_meanwhile(tmp_path: Path, other_process: int):
    async def resolve() -> None:
        cri = OneCRI(other_process, os.getpid())  # the operation's lookup, then the re-check finds another
        resolver = StorageResolver(StorageMode.POD_MOUNT, str(tmp_path), cri)  # type: ignore[arg-type]
        async with resolver.open(await cri.container_info("c1"), ID):
            pass

    with pytest.raises(StorageError, match="restarted or exited"):
        anyio.run(resolve)
