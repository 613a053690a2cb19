"""The pipelines' pure parts: the manifest's fields (built in one place for every target), the files a
restore reads ahead, the PIDs a checkpoint records; and what a host tree's failed checkpoint leaves."""

from pathlib import Path

import anyio

from dynamo_snapshot.agent.artifact.layout import DUMP_LOG, ArtifactLayout
from dynamo_snapshot.agent.artifact.manifest import Compatibility
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.pipeline.target import Workload, declared_files, manifest_fields
from dynamo_snapshot.agent.pipeline.trees import StagingGuard

HERE = Compatibility("4.1", "6.8.0", "x86_64")


def _options(**kw) -> criu.DumpOptions:
    return criu.DumpOptions.configured(criu.CriuSettings(), pid=100, images_dir=Path("/s"), freeze_cgroup=None,
                                       net_ns_inode=None, pid_ns_inode=None, external_mounts={}, **kw)


def test_a_container_checkpoint_records_pids_as_the_container_sees_them():
    workload = Workload(root_pid=4100, tasks={1: 4100, 7: 4107, 8: 4108}, stdio=["pipe:[1]", "", ""],
                        identity={"containerName": "main", "image": "img:1"}, external_mounts={"/data": "/data"},
                        reread=["/models/w.safetensors"])
    fields = manifest_fields("c1", "2", "2026-01-01T00:00:00Z", HERE, workload, ["etc/x"], ["/gone"],
                             _options(), {"processes": []})
    assert fields["workload"]["rootPID"] == 1
    assert fields["workload"]["pids"] == [1, 7, 8]
    assert fields["workload"]["containerName"] == "main" and fields["workload"]["image"] == "img:1"
    assert fields["workload"]["rootfsEntries"] == ["etc/x"] and fields["workload"]["deletedPaths"] == ["/gone"]
    assert fields["workload"]["rereadAfterRestore"] == ["/models/w.safetensors"]
    assert fields["criu"]["externalMounts"] == {"/data": "/data"}
    assert fields["checkpointID"] == "c1" and fields["artifactVersion"] == "2"
    assert fields["compatibility"]["criuVersion"] == "4.1"


def test_a_tree_checkpoint_records_host_pids_and_the_network_lock_its_dump_used():
    workload = Workload(root_pid=500, tasks={500: 500, 501: 501}, stdio=["", "", ""], identity={"processTree": True})
    fields = manifest_fields("t1", "1", "now", HERE, workload, [], [], _options(), {})
    assert fields["workload"]["rootPID"] == 500 and fields["workload"]["pids"] == [500, 501]
    assert fields["workload"]["processTree"] is True
    assert fields["criu"]["networkLock"] == "nftables"
    assert "--network-lock" in fields["criu"]["dumpArgv"]


def test_a_workload_maps_host_tids_back_to_its_own_pids():
    workload = Workload(root_pid=4100, tasks={1: 4100, 2: 4200}, stdio=[])
    assert workload.vpid_of(4200) == 2
    assert workload.vpid_of(9999) is None
    assert workload.host_tasks == [4100, 4200]


def test_a_restore_reads_ahead_only_the_absolute_paths_the_worker_declared():
    manifest = {"workload": {"rereadAfterRestore": ["/models/a", "relative", 3, "/models/b"]}}
    assert declared_files(manifest) == ["/models/a", "/models/b"]
    assert declared_files({}) == []
    assert declared_files({"workload": {"rereadAfterRestore": None}}) == []


def test_a_failed_tree_checkpoint_leaves_no_version_and_keeps_its_dump_log(tmp_path: Path):
    layout = ArtifactLayout(tmp_path, "t1")
    staging = layout.new_staging()
    (staging / DUMP_LOG).write_text("criu said no\n")
    kept = layout.failed_log(staging)

    async def fail_after_promotion() -> None:
        guard = StagingGuard(staging, kept)
        final = layout.promote(staging)
        await guard.promoted(final)
        await guard.trip()  # the confirmation never came

    anyio.run(fail_after_promotion)
    assert not layout.final_dir.exists()
    assert not staging.exists()


def test_a_failed_tree_checkpoint_before_promotion_removes_the_attempt(tmp_path: Path):
    layout = ArtifactLayout(tmp_path, "t2")
    staging = layout.new_staging()
    (staging / DUMP_LOG).write_text("criu said no\n")
    kept = layout.failed_log(staging)
    anyio.run(StagingGuard(staging, kept).trip)
    assert not staging.exists()
    assert kept.read_text() == "criu said no\n"
