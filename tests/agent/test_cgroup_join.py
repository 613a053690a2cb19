"""Which cgroups a restore joins on a cgroup v1 host: every mounted hierarchy the placeholder is in; a
named hierarchy that some tool left behind, mounted nowhere and holding the placeholder at its top, is
passed over (CRIU's own tests leave `name=zdtmtst` on a host, and restores failed on it)."""

from __future__ import annotations

import pytest

from dynamo_snapshot.agent.host import cgroups, procfs


@pytest.fixture
def v1_root(tmp_path, monkeypatch):
    for hierarchy in ("cpu,cpuacct", "freezer", "systemd"):
        (tmp_path / hierarchy).mkdir()
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    return tmp_path


def test_a_restore_joins_every_mounted_hierarchy_and_passes_over_a_stray_named_one(v1_root, monkeypatch):
    monkeypatch.setattr(procfs, "cgroup_paths", lambda pid: {
        "cpu,cpuacct": "/pods/p1", "freezer": "/pods/p1", "name=systemd": "/pods/p1", "name=zdtmtst": "/"})
    assert cgroups.procs_files(1234) == [v1_root / "cpu,cpuacct/pods/p1/cgroup.procs",
                                         v1_root / "freezer/pods/p1/cgroup.procs",
                                         v1_root / "systemd/pods/p1/cgroup.procs"]


def test_an_unmounted_hierarchy_that_holds_the_placeholder_below_its_top_is_refused_by_name(v1_root, monkeypatch):
    monkeypatch.setattr(procfs, "cgroup_paths", lambda pid: {"freezer": "/pods/p1", "name=other": "/pods/p1"})
    with pytest.raises(cgroups.CgroupError, match="'name=other' is not mounted under"):
        cgroups.procs_files(1234)
