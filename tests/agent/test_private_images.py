"""What CRIU and the agent parse in a restore is the copy the agent verified, not whatever storage holds
by then: a writer of storage who swaps a parsed image after the verification changes nothing (real
containerd, runc and CRIU), and the private copies are refused, named and cleaned up like the stored
files they come from."""

from __future__ import annotations

import enum
import hashlib
import os
from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact import private
from dynamo_snapshot.agent.artifact.private import PrivateImages
from dynamo_snapshot.agent.container.memimages import PE_PRESENT
from dynamo_snapshot.agent.errors import ArtifactInvalid
from dynamo_snapshot.agent.pipeline import restore as rst
from dynamo_snapshot.agent.pipeline.containers import PlaceholderTarget
from dynamo_snapshot.agent.pipeline.hooks import Hooks
from tests.agent import criu_images as img
from tests.agent import node_harness as harness

CHECKPOINT_ID = "swapped"


class SwapAfterVerify(Hooks):
    """The attacker's move, made the moment verification is over: every parsed image in storage is
    overwritten with zeros of the same size (CRIU would fail on them, or read what the attacker wrote)."""

    def __init__(self, version: Path):
        self.version = version
        self.swapped: list[str] = []

    async def on_stage(self, stage: enum.StrEnum) -> None:
        if stage.value != "pids":
            return
        for image in sorted(self.version.glob("*.img")):
            if not image.name.startswith("pages-"):
                size = image.stat().st_size
                image.unlink()  # a new file in its place, as a writer of the PVC may make
                image.write_bytes(b"\0" * size)
                self.swapped.append(image.name)


@pytest.mark.containers
def test_a_parsed_image_swapped_after_verification_is_not_what_criu_restores(
    node: harness.Node, bundle, pods: harness.Pods, tmp_path: Path
) -> None:
    source = pods.counter(heap_mib=16)
    base = tmp_path / "checkpoints"
    harness.checkpoint(node, bundle, source, base, CHECKPOINT_ID)
    placeholder = pods.placeholder()
    swap = SwapAfterVerify(artifact_layout.ArtifactLayout(base, CHECKPOINT_ID).final_dir)
    request = rst.RestoreRequest(CHECKPOINT_ID, base, private_root=tmp_path / "private")
    result = node.call(rst.restore, PlaceholderTarget(node.cri, placeholder.container_id), request, bundle, None, swap)
    assert "pstree.img" in swap.swapped and any(name.startswith("core-") for name in swap.swapped)
    assert result.workload_pid > 0
    harness.wait_for(lambda: "restored" in [e["event"] for e in placeholder.events()], 60, "the restored counter")
    assert list((tmp_path / "private").iterdir()) == []  # the copies went with the restore


def _version(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, dict]:
    version = tmp_path / "versions" / "1"
    version.mkdir(parents=True)
    entries = []
    for name, data in files.items():
        (version / name).write_bytes(data)
        entries.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return version, {"files": entries}


def test_the_parsed_files_are_copied_a_process_page_data_linked_and_shared_memory_copied(tmp_path: Path) -> None:
    version, manifest = _version(tmp_path, {
        "core-1.img": img.core(), "pstree.img": img.pstree((1, [1])),
        "pagemap-1.img": img.pagemap(1, (0x1000, 1, PE_PRESENT)), "pages-1.img": b"p" * 4096,
        "pagemap-shmem-9.img": img.pagemap(2, (0, 1, PE_PRESENT)), "pages-2.img": b"s" * 4096})
    images = PrivateImages.prepare(version, manifest, tmp_path / "private")
    try:
        assert not (images.path / "core-1.img").is_symlink()
        assert (images.path / "core-1.img").read_bytes() == img.core()
        assert (images.path / "pages-1.img").is_symlink()  # checked in the restored memory (memcheck)
        assert (images.path / "pages-1.img").read_bytes() == b"p" * 4096
        assert not (images.path / "pages-2.img").is_symlink()  # no one process holds it: a verified copy
        assert images.layout.shared == frozenset({"pages-2.img"})
        assert not os.readlink(images.path / "pages-1.img").startswith("/")  # resolved from CRIU's side too
        assert oct((tmp_path / "private").stat().st_mode & 0o777) == "0o700"
    finally:
        images.close()
    assert not images.path.exists()


@pytest.mark.parametrize("attack", ["symlink", "altered", "fifo"])
def test_a_stored_file_that_is_not_the_verified_one_is_refused_naming_it(tmp_path: Path, attack: str) -> None:
    version, manifest = _version(tmp_path, {"core-1.img": b"core", "pstree.img": b"tree"})
    (tmp_path / "elsewhere").write_bytes(b"core")
    (version / "core-1.img").unlink()
    if attack == "symlink":
        (version / "core-1.img").symlink_to(tmp_path / "elsewhere")
    elif attack == "altered":
        (version / "core-1.img").write_bytes(b"CORE")
    else:
        os.mkfifo(version / "core-1.img")
    with pytest.raises(ArtifactInvalid, match=str(version / "core-1.img")):
        PrivateImages.prepare(version, manifest, tmp_path / "private")
    assert list((tmp_path / "private").iterdir()) == []


def test_an_agent_start_sweeps_the_copies_a_killed_predecessor_left(tmp_path: Path) -> None:
    (tmp_path / "private" / "left-by-a-dead-agent").mkdir(parents=True)
    (tmp_path / "private" / "left-by-a-dead-agent" / "core-1.img").write_bytes(b"x")
    private.sweep(tmp_path / "private")
    assert list((tmp_path / "private").iterdir()) == []
