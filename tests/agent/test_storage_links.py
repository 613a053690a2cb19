"""Symlinks planted in storage steer nothing: the agent's creates, reads and removals under the
checkpoint base path never follow one (docs/security.md), on a real filesystem."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact import authn, beneath, layout
from dynamo_snapshot.agent.errors import ArtifactInvalid
from tests.agent.test_artifact_verification import HERE, make_artifact

OLD = time.time() - 7 * 86400


def _old_dirs(parent: Path, names: list[str]) -> None:
    for name in names:
        (parent / name).mkdir(parents=True)
        (parent / name / "restore.log").write_text("log\n")
        os.utime(parent / name, (OLD, OLD))


def test_pruning_through_a_symlinked_restores_directory_removes_nothing(tmp_path: Path) -> None:
    base = tmp_path / "base"
    outside = tmp_path / "outside"
    _old_dirs(outside, [f"d{i:02d}" for i in range(12)])
    (base / "ck").mkdir(parents=True)
    (base / "ck" / layout.RESTORES).symlink_to(outside)
    with pytest.raises(beneath.UnsafePath, match="ck/restores is a symbolic link"):
        layout.prune_restore_logs(base / "ck" / layout.RESTORES, keep=0, min_age_s=0)
    assert len(list(outside.iterdir())) == 12


def test_restores_pointed_at_the_base_path_deletes_no_other_checkpoint(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _old_dirs(base, ["other-1", "other-2", "other-3"])
    (base / "ck").mkdir()
    (base / "ck" / layout.RESTORES).symlink_to("..")
    with pytest.raises(beneath.UnsafePath):
        layout.prune_restore_logs(base / "ck" / layout.RESTORES, keep=0, min_age_s=0)
    with pytest.raises(beneath.UnsafePath):
        beneath.make_dirs(base, base / "ck" / layout.RESTORES / "container")
    assert sorted(p.name for p in base.iterdir()) == ["ck", "other-1", "other-2", "other-3"]


def test_a_symlink_inside_restores_is_unlinked_not_followed(tmp_path: Path) -> None:
    base = tmp_path / "base"
    restores = base / "ck" / layout.RESTORES
    _old_dirs(restores, ["r1"])
    victim = tmp_path / "victim"
    _old_dirs(victim, ["keep"])
    beneath.remove_children(base, restores, ["r1"])
    (restores / "l").symlink_to(victim)
    beneath.remove_children(base, restores, ["l"])
    assert not (restores / "r1").exists() and not (restores / "l").is_symlink()
    assert (victim / "keep" / "restore.log").exists()


def test_a_failed_attempt_log_is_not_written_through_a_symlinked_failed_directory(tmp_path: Path) -> None:
    base = tmp_path / "base"
    versions = layout.ArtifactLayout(base, "ck")
    staging = versions.new_staging()
    (staging / layout.DUMP_LOG).write_text("dump log\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "ck" / "failed").symlink_to(outside)
    with pytest.raises(beneath.UnsafePath, match="ck/failed is a symbolic link"):
        layout.discard_staging(staging, versions.failed_log(staging))
    assert list(outside.iterdir()) == []


def test_a_version_directory_that_is_a_symlink_is_not_restored_from(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    authn.create_key(keys, "k1")
    keyring = authn.Keyring.from_directory(keys)
    real = make_artifact(tmp_path / "elsewhere")
    base = tmp_path / "base"
    (base / "ck" / "versions").mkdir(parents=True)
    (base / "ck" / "versions" / "1").symlink_to(real)
    with pytest.raises(ArtifactInvalid, match="cannot be opened as a directory"):
        authn.verify_listing(base / "ck" / "versions" / "1", "abc", HERE, keyring)
