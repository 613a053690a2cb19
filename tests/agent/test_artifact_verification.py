"""Manifest, verification and promotion of checkpoint artifacts, on a real filesystem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact import verification
from dynamo_snapshot.agent.errors import ArtifactIncompatible, ArtifactInvalid, CheckpointError

HERE = artifact.Compatibility(criu_version="4.2.1", kernel="6.18.44", architecture="x86_64")


def make_artifact(base: Path, checkpoint_id: str = "abc", compatibility: artifact.Compatibility = HERE) -> Path:
    layout = artifact_layout.ArtifactLayout(base, checkpoint_id)
    staging = layout.new_staging()
    (staging / "pages-1.img").write_bytes(os.urandom(64 << 10))
    (staging / "dump.log").write_text("(00.1) Dumping finished successfully\n")
    (staging / "deleted-files.json").write_text("[]\n")
    artifact.write_manifest(staging, {"checkpointID": checkpoint_id, "compatibility": compatibility.to_json()})
    return layout.promote(staging)


def test_a_promoted_artifact_verifies(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    manifest = verification.verify(final, "abc", HERE)
    assert {f["path"] for f in manifest["files"]} == {"pages-1.img", "dump.log", "deleted-files.json"}
    assert not any((tmp_path / "abc" / "versions" / "tmp").iterdir())


def test_the_manifest_is_written_last(tmp_path: Path) -> None:
    staging = artifact_layout.ArtifactLayout(tmp_path, "abc").new_staging()
    (staging / "core-1.img").write_bytes(b"x")
    written = artifact.write_manifest(staging, {"checkpointID": "abc"})
    # Every file it lists existed before it, and it does not list itself.
    assert [f["path"] for f in written["files"]] == ["core-1.img"]
    assert (staging / "manifest.json").stat().st_mtime_ns >= (staging / "core-1.img").stat().st_mtime_ns


def test_promotion_never_replaces_an_existing_version(tmp_path: Path) -> None:
    make_artifact(tmp_path)
    layout = artifact_layout.ArtifactLayout(tmp_path, "abc")
    with pytest.raises(CheckpointError, match="already exists"):
        layout.new_staging()
    (layout.staging_root / "late").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        layout.promote(layout.staging_root / "late")


@pytest.mark.parametrize("name", ["../etc", "tmp", "", "a/b", ".hidden"])
def test_layout_refuses_names_that_are_not_one_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cannot be a directory name"):
        artifact_layout.ArtifactLayout(tmp_path, name)


def test_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    data = bytearray((final / "pages-1.img").read_bytes())
    data[1000] ^= 0x01
    (final / "pages-1.img").write_bytes(bytes(data))
    with pytest.raises(ArtifactInvalid, match=r"pages-1\.img has SHA-256"):
        verification.verify(final, "abc", HERE)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    os.truncate(final / "dump.log", 3)
    with pytest.raises(ArtifactInvalid, match=r"dump\.log is 3 bytes"):
        verification.verify(final, "abc", HERE)


def test_a_removed_file_is_refused(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    (final / "deleted-files.json").unlink()
    with pytest.raises(ArtifactInvalid, match=r"deleted-files\.json is listed in the manifest but missing"):
        verification.verify(final, "abc", HERE)


def test_an_unlisted_file_is_refused(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    (final / "core-9.img").write_bytes(b"?")
    with pytest.raises(ArtifactInvalid, match=r"does not list: core-9\.img"):
        verification.verify(final, "abc", HERE)


def test_no_manifest_means_no_checkpoint(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    (final / "manifest.json").unlink()
    with pytest.raises(ArtifactInvalid, match="never completed"):
        verification.verify(final, "abc", HERE)


def test_another_checkpoint_id_is_refused(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    with pytest.raises(ArtifactInvalid, match="holds checkpoint 'abc', not the requested 'xyz'"):
        verification.verify(final, "xyz", HERE)


def test_a_manifest_path_outside_the_artifact_is_refused(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    manifest = json.loads((final / "manifest.json").read_text())
    manifest["files"].append({"path": "../../../etc/passwd", "size": 1, "sha256": "0" * 64})
    (final / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactInvalid, match="unsafe path"):
        verification.verify(final, "abc", HERE)


@pytest.mark.parametrize(
    ("recorded", "reason"),
    [
        (artifact.Compatibility("4.2.1", "6.18.44", "aarch64"), "made on aarch64, this node is x86_64"),
        (artifact.Compatibility("4.3.0", "6.18.44", "x86_64"), "made by CRIU 4.3.0, this node has CRIU 4.2.1"),
        (artifact.Compatibility("3.19", "6.18.44", "x86_64"), "made by CRIU 3.19"),
        (artifact.Compatibility("4.2.1", "6.18.44", "x86_64", cuda_driver_version="570.86"), "holds CUDA state"),
    ],
    ids=["architecture", "newer-criu", "other-criu-major", "cuda-without-driver"],
)
def test_an_incompatible_node_is_refused(tmp_path: Path, recorded: artifact.Compatibility, reason: str) -> None:
    final = make_artifact(tmp_path, compatibility=recorded)
    with pytest.raises(ArtifactIncompatible, match=reason):
        verification.verify(final, "abc", HERE)


def test_a_different_kernel_is_only_a_warning(tmp_path: Path) -> None:
    final = make_artifact(tmp_path, compatibility=artifact.Compatibility("4.2.0", "6.12.1", "x86_64"))
    assert verification.verify(final, "abc", HERE)["checkpointID"] == "abc"
    assert artifact.check_compatible(artifact.Compatibility("4.2.0", "6.12.1", "x86_64"), HERE) == [
        "made on kernel 6.12.1, restoring on 6.18.44"
    ]


def test_a_failed_attempt_keeps_its_dump_log(tmp_path: Path) -> None:
    layout = artifact_layout.ArtifactLayout(tmp_path, "abc")
    staging = layout.new_staging()
    (staging / "dump.log").write_text("Error (criu/cr-dump.c:1): Dumping FAILED.\n")
    (staging / "pages-1.img").write_bytes(b"partial")
    artifact_layout.discard_staging(staging, layout.failed_log(staging))
    assert not staging.exists()
    assert layout.failed_log(staging).read_text().endswith("Dumping FAILED.\n")
    assert not layout.final_dir.exists()


def test_old_restore_logs_are_pruned_but_never_a_recent_one_nor_through_a_symlink(tmp_path: Path) -> None:
    restores = tmp_path / "ckpt" / "restores"
    now = 1_000_000.0
    for i in range(12):  # r00 oldest; r10, r11 less than an hour old
        attempt = restores / f"r{i:02d}"
        attempt.mkdir(parents=True)
        (attempt / "restore.log").write_text("criu log\n")
        age = 30.0 if i >= 10 else 7200.0 + (12 - i) * 60
        os.utime(attempt, (now - age, now - age))
    elsewhere = tmp_path / "not-ours"
    elsewhere.mkdir()
    (restores / "link").symlink_to(elsewhere)
    removed = artifact_layout.prune_restore_logs(restores, keep=8, now=now)
    assert sorted(removed) == ["r00", "r01", "r02", "r03"]
    assert sorted(p.name for p in restores.iterdir()) == ["link"] + [f"r{i:02d}" for i in range(4, 12)]
    assert elsewhere.exists()
    # a burst of young attempts beyond `keep`: all kept (another node may be using one right now)
    burst = tmp_path / "busy" / "restores"
    for i in range(10):
        (burst / f"b{i}").mkdir(parents=True)
        os.utime(burst / f"b{i}", (now - 10 - i, now - 10 - i))
    assert artifact_layout.prune_restore_logs(burst, keep=8, now=now) == []
    assert artifact_layout.prune_restore_logs(tmp_path / "missing", keep=8) == []


def test_a_fresh_attempt_withdraws_the_unconfirmed_version_an_earlier_killed_attempt_left(tmp_path: Path):
    """An agent killed between promotion and confirmation leaves versions/1 that no verdict vouches for;
    the next attempt of the same checkpoint (it holds the Lease, its Job has no verdict) is not blocked
    by it (`version 1 already exists`) but withdraws it and dumps afresh."""
    layout = artifact_layout.ArtifactLayout(tmp_path, "abc")
    left = layout.promote(layout.new_staging())
    (left / "pages-1.img").write_bytes(b"from the killed attempt")
    with pytest.raises(CheckpointError, match="already exists"):
        layout.new_staging()
    assert layout.withdraw_unconfirmed() is True
    assert not layout.final_dir.exists() and not list(layout.versions_dir.glob("*/pages-1.img"))
    assert layout.new_staging().parent == layout.staging_root
    assert layout.withdraw_unconfirmed() is False  # nothing left to withdraw


def _rewrite(final: Path, change) -> None:
    path = final / artifact_layout.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(files=["pages-1.img"]), r"field files\[0\] must be an object"),
        (
            lambda m: m["files"][0].update(size="1870"),
            r"field files\[0\]\.size must be a byte count \(integer\), got a string",
        ),
        (lambda m: m["files"][0].update(path=7), r"field files\[0\]\.path must be a relative path, got int 7"),
        (lambda m: m["files"][0].update(sha256=None), r"field files\[0\]\.sha256 must be a SHA-256 hex digest"),
        (lambda m: m.update(workload="x"), "field workload must be an object, got a string"),
        (lambda m: m.update(workload={"pids": ["1"]}), r"field workload\.pids\[0\] must be PIDs \(integers\)"),
        (lambda m: m.update(workload={"rereadAfterRestore": [5]}), r"workload\.rereadAfterRestore\[0\] must be"),
        (lambda m: m.update(criu={"externalMounts": []}), r"field criu\.externalMounts must be an object"),
        (lambda m: m.pop("compatibility"), "field compatibility is missing"),
        (lambda m: m.update(formatVersion="1"), "field formatVersion must be an integer"),
    ],
)
def test_a_malformed_manifest_field_is_refused_by_name(tmp_path: Path, change, message: str) -> None:
    final = make_artifact(tmp_path)
    _rewrite(final, change)
    with pytest.raises(ArtifactInvalid, match=message):
        verification.verify(final, "abc", HERE)


def test_a_symlinked_file_is_reported_as_a_link_not_as_missing(tmp_path: Path) -> None:
    final = make_artifact(tmp_path)
    (tmp_path / "outside").write_text("[]\n")
    (final / "deleted-files.json").unlink()
    (final / "deleted-files.json").symlink_to(tmp_path / "outside")
    with pytest.raises(ArtifactInvalid, match=r"deleted-files\.json is a symbolic link"):
        verification.verify(final, "abc", HERE)
