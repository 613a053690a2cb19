"""The agent daemon's decisions that need no cluster: which pods ask for what, its configuration and
command line, and where podMount storage may lead."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
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
from dynamo_snapshot.agent.container.criu import CriuSettings, DumpOptions, RestoreOptions
from dynamo_snapshot.agent.container.runtime import ContainerInfo
from dynamo_snapshot.agent.service import config, main, podwork
from dynamo_snapshot.agent.service.lease import live_holder
from dynamo_snapshot.api import names

ID = "abc123"


def pod(*, source: bool, ready: bool = True, container_id: str | None = "containerd://c1", phase: str = "Running",
        annotations: dict[str, str] | None = None, targets: str = "main") -> dict:
    labels = {names.LABEL_CHECKPOINT_ID: ID}
    metadata = {"namespace": "ns", "name": "p", "uid": "u", "labels": labels,
                "annotations": {names.ANN_TARGET_CONTAINERS: targets, **(annotations or {})}}
    if source:
        labels[names.LABEL_IS_CHECKPOINT_SOURCE] = "true"
        metadata["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "job-1", "uid": "j"}]
    status = {"name": "main", "ready": ready, "state": {"running": {}} if container_id else {"waiting": {}}}
    if container_id:
        status["containerID"] = container_id
    return {"metadata": metadata, "status": {"phase": phase, "containerStatuses": [status]}}


# -- which pods ask for what ---------------------------------------------------------------------------------
def test_a_ready_source_pod_asks_for_a_checkpoint_of_its_target():
    (work,) = podwork.work_for(pod(source=True))
    assert isinstance(work, podwork.CheckpointWork)
    assert (work.job, work.container, work.container_id, work.checkpoint_id, work.artifact_version) == (
        "job-1", "main", "c1", ID, "1")


@pytest.mark.parametrize("change", ["not ready", "no job", "two targets", "being deleted"])
def test_a_source_pod_asks_for_nothing_until_it_can_be_checkpointed(change):
    obj = pod(source=True, ready=change != "not ready", targets="main,side" if change == "two targets" else "main")
    if change == "no job":
        obj["metadata"].pop("ownerReferences")
    if change == "being deleted":
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert podwork.work_for(obj) == []


def test_a_restore_pod_asks_for_a_restore_once_its_container_runs():
    assert podwork.work_for(pod(source=False, container_id=None, phase="Pending")) == []
    (work,) = podwork.work_for(pod(source=False, ready=False))
    assert isinstance(work, podwork.RestoreWork) and work.container_id == "c1" and not work.interrupted
    assert podwork.work_for(pod(source=False, phase="Succeeded")) == []


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_container_id_is_never_restored_twice(status):
    done = {names.restore_status_annotation("main"): status, names.restore_container_id_annotation("main"): "c1"}
    assert podwork.work_for(pod(source=False, annotations=done)) == []
    # A new container (the kubelet restarted it) is a new restore.
    (work,) = podwork.work_for(pod(source=False, annotations=done, container_id="containerd://c2"))
    assert work.container_id == "c2"


def test_a_restore_left_in_progress_for_the_running_container_is_interrupted():
    left = {names.restore_status_annotation("main"): "in_progress", names.restore_container_id_annotation("main"): "c1"}
    (work,) = podwork.work_for(pod(source=False, annotations=left))
    assert work.interrupted


def test_pod_mount_storage_path_comes_from_the_pod_when_it_says():
    obj = pod(source=True, annotations={names.ANN_STORAGE_BASE_PATH: "/data/ckpts"})
    assert podwork.work_for(obj)[0].base_path == "/data/ckpts"


# -- configuration and command line --------------------------------------------------------------------------
def test_criu_settings_from_the_chart_config(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("criu:\n  logLevel: 2\n  tcpEstablished: false\n  networkLock: ''\n  timeoutSeconds: 600\n"
                    "  extraArgs: [--skip-file-rwx-check]\n")
    settings = config.load(path).criu
    assert settings == CriuSettings(log_level=2, tcp_established=False, network_lock="", timeout_s=600,
                                    extra_args=("--skip-file-rwx-check",))
    dump = DumpOptions.configured(settings, pid=1, images_dir=Path("/i"), freeze_cgroup=Path("/f"), net_ns_inode=1,
                                  pid_ns_inode=2, external_mounts={}).argv()
    assert "--network-lock" not in dump and "--tcp-established" not in dump  # CRIU's defaults
    assert dump[dump.index("--timeout") + 1] == "600" and "-v2" in dump and dump[-1] == "--skip-file-rwx-check"
    restore = RestoreOptions.configured(settings, images_dir="/i", work_dir="/w", pid_ns_fd=3, net_ns_fd=4,
                                        external_mounts={}).argv()
    assert restore[-1] == "--skip-file-rwx-check" and "-v2" in restore


def test_restore_settings_from_the_config(tmp_path: Path):
    path = tmp_path / "config.yaml"
    assert config.load(None).restore == config.RestoreSettings(verify_threads=None, prefetch_threads=8)
    path.write_text("restore:\n  verifyThreads: 32\n  prefetchThreads: 0\n")
    assert config.load(path).restore == config.RestoreSettings(verify_threads=32, prefetch_threads=0)


@pytest.mark.parametrize("text, complaint", [
    ("restore:\n  verifyThreads: 0\n", "restore.verifyThreads: must be 1-256"),
    ("restore:\n  prefetchThreads: 'many'\n", "restore.prefetchThreads: expected int"),
    ("restore:\n  prefetch: 8\n", "restore: unknown keys prefetch"),
    ("criu:\n  logLevel: 9\n", "criu.logLevel: must be 0-4"),
    ("criu:\n  tcpEstablished: 'yes'\n", "criu.tcpEstablished: expected bool"),
    ("criu:\n  networkLock: ipfw\n", "criu.networkLock"),
    ("criu:\n  timeoutSecs: 5\n", "unknown keys timeoutSecs"),
    ("crui: {}\n", "unknown keys crui"),
])
def test_a_misspelt_or_wrong_option_is_refused_with_its_name(tmp_path: Path, text: str, complaint: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=complaint):
        config.load(path)


def test_agent_mount_serves_only_its_own_namespace_and_needs_to_know_it():
    parser = main.build_parser()
    args = parser.parse_args(["--node-name=n", "--namespace=team-a"])
    assert main.options_from(args, parser).watched_namespace == "team-a"
    args = parser.parse_args(["--node-name=n", "--namespace=infra", "--storage-access-mode=podMount"])
    assert main.options_from(args, parser).watched_namespace is None  # one agent for the cluster
    args = parser.parse_args(["--node-name=n", "--namespace=infra", "--storage-access-mode=podMount",
                              "--namespace-restricted"])
    assert main.options_from(args, parser).watched_namespace == "infra"
    env = {k: v for k, v in os.environ.items() if k not in ("POD_NAMESPACE", "NODE_NAME")}
    result = subprocess.run([sys.executable, "-m", "dynamo_snapshot.agent.service.main", "--node-name=n"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "--namespace is required with agentMount" in result.stderr


def test_the_runtime_socket_defaults_by_runtime_type():
    parser = main.build_parser()
    args = parser.parse_args(["--node-name=n", "--namespace=a", "--runtime-type=crio"])
    assert main.options_from(args, parser).runtime_socket == "/var/run/crio/crio.sock"


def test_a_lease_is_live_until_its_duration_passes_since_renewal():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    lease = {"spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                      "renewTime": (now - timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
    assert live_holder(lease, now) == "a"
    assert live_holder(lease, now + timedelta(seconds=6)) is None
    released = copy.deepcopy(lease)
    released["spec"]["holderIdentity"] = ""
    assert live_holder(released, now) is None


# -- podMount storage ----------------------------------------------------------------------------------------
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
        resolver = StorageResolver(StorageMode.POD_MOUNT, "/unused", OneCRI(other_process))  # type: ignore[arg-type]
        async with resolver.open("c1", ID, str(base)) as path:
            (path / "probe").write_text("x")
            return path

    path = anyio.run(resolve)
    assert (base / "probe").read_text() == "x"
    assert str(path).startswith(f"/proc/{os.getpid()}/fd/")


def test_pod_mount_storage_is_refused_when_the_container_restarted_meanwhile(tmp_path: Path, other_process: int):
    async def resolve() -> None:
        resolver = StorageResolver(StorageMode.POD_MOUNT, str(tmp_path), OneCRI(other_process, os.getpid()))  # type: ignore[arg-type]
        async with resolver.open("c1", ID):
            pass

    with pytest.raises(StorageError, match="restarted or exited"):
        anyio.run(resolve)
