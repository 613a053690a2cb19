"""Rootfs diff capture from a real overlay upper directory, and its confined application."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent.container import rootfs
from dynamo_snapshot.agent.host import inroot

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mounts, chroot)")


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(merged, upper) of an overlay over a small lower layer."""
    lower, upper, work, merged = (tmp_path / d for d in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "etc").mkdir()
    (lower / "etc" / "motd").write_text("image\n")
    (lower / "cache").mkdir()
    (lower / "cache" / "old").write_text("stale\n")
    (lower / "proc").mkdir()
    result = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount overlay here: {result.stderr.strip()}")
    try:
        yield merged, upper
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


@needs_root
def test_capture_archives_writes_and_lists_deletions_but_not_mountpoints(overlay: tuple[Path, Path], tmp_path: Path):
    merged, upper = overlay
    (merged / "data").mkdir()
    (merged / "data" / "state.txt").write_text("written at runtime\n")
    os.symlink("/etc/motd", merged / "data" / "link")
    os.chown(merged / "data" / "state.txt", 1234, 5678)
    (merged / "etc" / "motd").unlink()  # whiteout
    subprocess.run(["rm", "-rf", str(merged / "cache")], check=True)
    (merged / "cache").mkdir()  # opaque directory replacing the image's
    (merged / "cache" / "new").write_text("fresh\n")
    (merged / "proc" / "junk").write_text("below a mountpoint\n")

    diff, deleted = tmp_path / "rootfs-diff.tar", tmp_path / "deleted-files.json"
    rootfs.capture(upper, {"/", "/proc"}, diff, deleted)

    with tarfile.open(diff) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert {"data", "data/state.txt", "data/link", "cache", "cache/new"} <= set(members)
    assert not any(name.startswith("proc") for name in members)
    assert "etc/motd" not in members
    assert members["data/state.txt"].uid == 1234 and members["data/state.txt"].gid == 5678
    assert members["data/link"].issym() and members["data/link"].linkname == "/etc/motd"
    assert set(json.loads(deleted.read_text())) == {"etc/motd", "cache"}


def _extract(root: Path, archive: Path, deleted: Path | None, skip: list[str]) -> None:
    fds = {"--archive-fd": os.open(archive, os.O_RDONLY)}
    if deleted is not None:
        fds["--deleted-fd"] = os.open(deleted, os.O_RDONLY)
    command = ["extract", "--within", "/"]
    for path in skip:
        command += ["--skip", path]
    try:
        anyio.run(inroot.run, str(root), command, fds)
    finally:
        for fd in fds.values():
            os.close(fd)


@needs_root
def test_apply_deletes_then_extracts_inside_the_root_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("image\n")
    (root / "cache").mkdir()
    (root / "cache" / "old").write_text("stale\n")
    (root / "etc" / "hosts").write_text("mounted by the runtime\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    # A container-made symlink pointing at a host path: resolved inside the root, never on the host.
    os.symlink(str(outside), root / "escape")
    (root / str(outside).lstrip("/")).mkdir(parents=True)

    archive = tmp_path / "diff.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in {"cache/new": b"fresh\n", "escape/pwned": b"x", "etc/hosts": b"overwritten\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    deleted = tmp_path / "deleted.json"
    deleted.write_text(json.dumps(["etc/motd", "cache", "../../outside"]))

    _extract(root, archive, deleted, skip=["/etc/hosts"])

    assert not (root / "etc" / "motd").exists()
    assert not (root / "cache" / "old").exists()
    assert (root / "cache" / "new").read_text() == "fresh\n"
    assert (root / "etc" / "hosts").read_text() == "mounted by the runtime\n"
    assert not (outside / "pwned").exists()
    assert list(outside.iterdir()) == []
    assert (root / str(outside).lstrip("/") / "pwned").exists()
