"""A counter workload (200 MB heap, TCP listener, /dev/shm segment, files in its root filesystem) in a
CRI-created container is checkpointed and restored into a placeholder container in a new sandbox,
all on real containerd, runc and CRIU."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container import control
from dynamo_snapshot.agent.errors import ArtifactInvalid
from dynamo_snapshot.agent.pipeline.checkpoint import CheckpointResult
from tests.agent import node_harness as harness

pytestmark = pytest.mark.containers

CHECKPOINT_ID = "roundtrip"
REREAD = "/opt/workloads"


@dataclass
class Stored:
    source: harness.Workload
    result: CheckpointResult
    base: Path


@pytest.fixture(scope="module")
def stored(node: harness.Node, bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    workdir = tmp_path_factory.mktemp("roundtrip")
    # the worker names a directory it reads again after a restore (as it would its weights)
    source = harness.Pods(node, workdir).counter(heap_mib=200, COUNTER_REREAD=REREAD)
    result = harness.checkpoint(node, bundle, source, workdir / "checkpoints", CHECKPOINT_ID)
    yield Stored(source, result, workdir / "checkpoints")
    node.remove_pod(source.pod)


def query(ip: str, port: int = 7777) -> dict:
    with socket.create_connection((ip, port), timeout=10) as conn:
        return json.loads(conn.recv(4096))


def test_source_is_told_snapshot_complete_and_exits_zero(node: harness.Node, stored: Stored) -> None:
    assert stored.result.workload_notified
    harness.wait_for(
        lambda: node.info(stored.source.container_id).state == "CONTAINER_EXITED", 60, "the checkpoint source to exit"
    )
    assert node.info(stored.source.container_id).exit_code == 0
    assert "snapshot-complete" in [e["event"] for e in stored.source.events()]


def test_artifact_is_promoted_complete_with_every_file_in_the_manifest(stored: Stored) -> None:
    final = stored.base / CHECKPOINT_ID / "versions" / "1"
    assert stored.result.directory == final
    assert not any((final.parent / "tmp").iterdir()), "staging directories were left behind"
    manifest = json.loads((final / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.name for p in final.iterdir()} - {"manifest.json", "manifest.json.mac"}
    assert set(listed) == on_disk
    assert (final / "manifest.json.mac").read_text().startswith(f"hmac-sha256 {manifest['keyID']} ")
    for name in ("dump.log", "rootfs-diff.tar", "deleted-files.json", "dev-shm.tar", "pstree.img"):
        assert name in listed
    for name, entry in listed.items():
        assert entry["size"] == (final / name).stat().st_size
        if "chunkSha256" in entry:  # a large page image: one digest per chunk
            size, step = entry["size"], entry["chunkBytes"]
            chunks = [artifact.sha256_range(final / name, at, min(step, size - at)) for at in range(0, size, step)]
            assert entry["chunkSha256"] == chunks
        else:
            assert entry["sha256"] == artifact.sha256_file(final / name)
    assert manifest["checkpointID"] == CHECKPOINT_ID
    assert manifest["compatibility"]["criuVersion"] == "4.2.1"
    assert manifest["compatibility"]["architecture"] == os.uname().machine
    assert "opt/workloads/doomed.txt" in json.loads((final / "deleted-files.json").read_text())
    # snapshot-init started the workload above the PIDs a restore pod uses before the restore
    assert manifest["workload"]["rootPID"] >= 1000
    assert min(manifest["workload"]["pids"]) >= 1000
    assert manifest["workload"]["rereadAfterRestore"] == [REREAD]


def test_a_containers_page_images_were_digested_while_criu_wrote_them(stored: Stored) -> None:
    # the digests checked against the files above are the follower's (artifact/following.py)
    pages = [f["path"] for f in stored.result.manifest["files"] if f["path"].startswith("pages-")]
    assert pages and set(pages) <= set(stored.result.digested_during_dump)


def test_restored_counter_continues_without_gap_with_its_memory_socket_shm_and_files(
    node: harness.Node, bundle, stored: Stored, pods: harness.Pods
) -> None:
    placeholder = pods.placeholder()
    info = node.info(placeholder.container_id)
    assert node.call(control.read_signal, info, "restore-complete") is None
    result = harness.restore(node, bundle, placeholder, stored.base, CHECKPOINT_ID)
    assert result.workload_pid == stored.result.manifest["workload"]["rootPID"]
    # what a restarted agent reads to know the restore got to its end
    assert json.loads(node.call(control.read_signal, info, "restore-complete"))["workloadPID"] == result.workload_pid

    restored = harness.wait_for(
        lambda: next((e for e in placeholder.events() if e["event"] == "restored"), None),
        60,
        "the restored counter to report on the placeholder's stdout",
    )
    assert restored["heap_ok"], "the 200 MB heap changed across checkpoint/restore"
    assert restored["shm_ok"], "/dev/shm did not keep the value written before the checkpoint"

    harness.wait_for(
        lambda: len(harness.counter_log(node, placeholder)) > restored["count"] + 20,
        60,
        "the restored counter to keep counting",
    )
    values = harness.counter_log(node, placeholder)
    assert values == list(range(1, len(values) + 1)), "counter.log has a gap or a repeat across the restore"

    answer = query(placeholder.pod.ip)
    assert answer["restored"] is True
    assert answer["count"] > restored["count"]

    root = Path("/proc") / str(node.info(placeholder.container_id).pid) / "root"
    # the declared directory was read into the page cache, as the placeholder sees it
    assert result.prefetch is not None
    fetched = result.prefetch.wait(timeout=60)
    assert fetched.errors == ()
    assert fetched.bytes_read == sum(f.stat().st_size for f in (root / REREAD.lstrip("/")).rglob("*") if f.is_file())
    assert result.background_seconds["prefetch-pages"] > 0
    assert (root / "data" / "written-before-checkpoint.txt").read_text() == "survives the restore\n"
    assert not (root / "opt" / "workloads" / "doomed.txt").exists()
    assert (root / "opt" / "workloads" / "counter.py").exists()

    # snapshot-init adopted the restored workload: a stop reaches it, and its status is the container's.
    node.call(node.cri.stop_container, placeholder.container_id, 10)
    info = node.info(placeholder.container_id)
    assert info.state == "CONTAINER_EXITED"
    assert info.exit_code == 128 + 15, placeholder.log()


def _copy_artifact(stored: Stored, base: Path, checkpoint_id: str = CHECKPOINT_ID) -> Path:
    """Hard-link copy (cheap); a file that a test alters is replaced by a real copy first."""
    target = base / checkpoint_id / "versions" / "1"
    shutil.copytree(stored.result.directory, target, copy_function=os.link)
    return target


def _own_copy(path: Path) -> Path:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _largest_pages(directory: Path) -> Path:
    return max(directory.glob("pages-*.img"), key=lambda p: p.stat().st_size)


def flip_a_byte(directory: Path) -> str:
    pages = _own_copy(_largest_pages(directory))
    with pages.open("r+b") as f:
        f.seek(pages.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return pages.name


def truncate_a_file(directory: Path) -> str:
    target = _own_copy(directory / "rootfs-diff.tar")
    os.truncate(target, target.stat().st_size - 512)
    return target.name


def remove_a_file(directory: Path) -> str:
    (directory / "pstree.img").unlink()
    return "pstree.img"


def add_an_unlisted_file(directory: Path) -> str:
    (directory / "extra.img").write_bytes(b"not from the dump")
    return "extra.img"


def remove_the_manifest(directory: Path) -> str:
    (directory / "manifest.json").unlink()
    return "manifest.json"


@pytest.mark.parametrize(
    "tamper",
    [flip_a_byte, truncate_a_file, remove_a_file, add_an_unlisted_file, remove_the_manifest],
    ids=lambda f: f.__name__,
)
def test_altered_artifact_is_refused_and_nothing_is_restored(
    node: harness.Node, bundle, stored: Stored, pods: harness.Pods, tmp_path: Path, tamper: Callable[[Path], str]
) -> None:
    base = tmp_path / "checkpoints"
    culprit = tamper(_copy_artifact(stored, base))
    placeholder = pods.placeholder()
    with pytest.raises(ArtifactInvalid, match=culprit.replace(".", r"\.")):
        harness.restore(node, bundle, placeholder, base, CHECKPOINT_ID)
    # a parsed file: refused before anything was changed in it, the placeholder left as it was, still
    # waiting (the agent's service then tells it restore-failed rather than restart it into the same
    # refusal). The page data is checked where CRIU put it, in the held tasks' memory: they never ran,
    # and the placeholder was killed with them (the kubelet restarts it clean; the agent tells that one)
    if tamper is flip_a_byte:
        harness.wait_for(lambda: node.info(placeholder.container_id).state == "CONTAINER_EXITED", 30,
                         "the placeholder killed with the held tasks")
    else:
        assert node.info(placeholder.container_id).state == "CONTAINER_RUNNING"
    assert not (placeholder.control / "restore-complete").exists()
    assert "restored" not in [e["event"] for e in placeholder.events()]


def test_artifact_of_another_checkpoint_id_is_refused(
    node: harness.Node, bundle, stored: Stored, pods: harness.Pods, tmp_path: Path
) -> None:
    base = tmp_path / "checkpoints"
    _copy_artifact(stored, base, checkpoint_id="someone-else")
    placeholder = pods.placeholder()
    with pytest.raises(ArtifactInvalid, match="holds checkpoint 'roundtrip', not the requested 'someone-else'"):
        harness.restore(node, bundle, placeholder, base, "someone-else")
    assert not (placeholder.control / "restore-complete").exists()


def test_a_pod_of_another_namespace_cannot_restore_the_checkpoint(
    node: harness.Node, bundle, stored: Stored, pods: harness.Pods, tmp_path: Path
) -> None:
    """Checkpoint IDs are not secrets and one storage may hold several namespaces' checkpoints (an
    agent's own mount, a bucket): the manifest records the source pod's namespace, authenticated with
    the rest, and only a pod of that namespace restores it."""
    assert stored.result.manifest["workload"]["namespace"] == "default"
    base = tmp_path / "checkpoints"
    _copy_artifact(stored, base)
    placeholder = pods.placeholder()
    with pytest.raises(ArtifactInvalid, match="was checkpointed in namespace 'default': a pod of namespace "
                                              "'other-team' cannot restore it"):
        harness.restore(node, bundle, placeholder, base, CHECKPOINT_ID, namespace="other-team")
    assert node.info(placeholder.container_id).state == "CONTAINER_RUNNING"  # refused before anything changed
    assert not (placeholder.control / "restore-complete").exists()
