"""A placeholder image built without Docker - the cached Debian + python3 base layer, a stand-in runtime
layer with its own ENTRYPOINT and CMD, and the placeholder's files from images/placeholder/layout.py (what
the Dockerfile copies) - imported into a throwaway containerd and run through CRI like a kubelet would:
a pod that sets nothing, or only args, runs the runtime's entrypoint under snapshot-init as PID 1; a pod
command (which the operator prefixes with `snapshot-init --`) runs as written; a restore pod stands by."""

from __future__ import annotations

import json
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent import node_harness as harness

from .support import REPO, layout

pytestmark = pytest.mark.containers

REF = "localhost/dynamo-snapshot/runtime-placeholder:test"
RUNTIME_ENTRYPOINT = ["/opt/runtime/entrypoint.sh"]
RUNTIME_CMD = ["python3", "-c", "print('default command', flush=True)"]
# The stand-in runtime's entrypoint, in the style of NVIDIA's: announce, then run the arguments.
ENTRYPOINT_SCRIPT = b"""#!/bin/sh
echo "runtime-entrypoint pid=$$ ppid=$PPID args=$*"
exec "$@"
"""
SHOW_PROCESS = ["python3", "-c", "import os; from dynamo_snapshot import workload; "
                "print('workload', os.getpid(), os.getppid(), workload.enabled(), flush=True)"]


def _tar_tree(root: Path, out: Path) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_file():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return out


def _image_config(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> dict:
            member = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert member is not None
            return json.loads(member.read())
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = blob(index["manifests"][0]["digest"])
        return blob(manifest["config"]["digest"])


@pytest.fixture(scope="module")
def placeholder_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = harness.missing()
    if reason:
        pytest.skip(reason)
    builder = harness._load_image_builder()
    work = tmp_path_factory.mktemp("placeholder-image")
    runtime_root = work / "runtime"
    (runtime_root / "opt" / "runtime").mkdir(parents=True)
    script = runtime_root / "opt" / "runtime" / "entrypoint.sh"
    script.write_bytes(ENTRYPOINT_SCRIPT)
    script.chmod(0o755)
    runtime_layer = builder._layer(_tar_tree(runtime_root, work / "runtime.tar"))
    tree = layout().write_tree(work / "placeholder", REPO, "stand-in-runtime:1", RUNTIME_ENTRYPOINT, RUNTIME_CMD,
                               criu_bundle=harness.criu_bundle())
    placeholder_layer = builder._layer(_tar_tree(tree, work / "placeholder.tar"))
    return builder.oci_archive(
        work / "image.tar",
        REF,
        [builder.base_layer(), runtime_layer, placeholder_layer],
        entrypoint=layout().ENTRYPOINT,
        cmd=layout().CMD,
        env={"PYTHONPATH": layout().pythonpath(None)},
    )


@pytest.fixture(scope="module")
def node(placeholder_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Node]:
    with harness.running_node(tmp_path_factory.mktemp("node")) as running:
        running.ctr("images", "import", str(placeholder_archive))
        yield running


def test_the_image_config_runs_snapshot_init_with_the_runtime_entrypoint(placeholder_archive: Path) -> None:
    config = _image_config(placeholder_archive)["config"]
    assert config["Entrypoint"] == ["/usr/local/bin/snapshot-init", "--runtime-entrypoint"]
    assert config["Cmd"] == []
    assert "PYTHONPATH=/opt/dynamo-snapshot" in config["Env"]


def test_ctr_imports_the_image(node: harness.Node) -> None:
    listed = node.ctr("images", "ls", "-q").stdout.decode().split()
    assert REF in listed


class Run:
    """One container of the placeholder image in its own pod, created as a kubelet does it."""

    def __init__(self, node: harness.Node, command: list[str], args: list[str], env: dict[str, str], user: int = 0):
        self.node = node
        self.pod = node.run_pod(f"ph-{uuid.uuid4().hex[:6]}")
        pb = node.cri.pb  # type: ignore[union-attr]
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="main", attempt=0),
            image=pb.ImageSpec(image=REF),
            command=command,
            args=args,
            envs=[pb.KeyValue(key=k, value=v) for k, v in env.items()],
            log_path="main.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    run_as_user=pb.Int64Value(value=user),
                    no_new_privs=True,
                    namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD),
                ),
            ),
        )
        self.id = node.call(node.cri.create_container, self.pod.sandbox_id, config, self.pod.config)  # type: ignore
        self.pod.containers.append(self.id)
        node.call(node.cri.start_container, self.id)  # type: ignore[union-attr]

    def argv(self) -> list[str]:
        return self.node.info(self.id).spec["process"]["args"]

    def wait(self) -> int:
        harness.wait_for(lambda: self.node.info(self.id).state == "CONTAINER_EXITED", 60, "the container to exit")
        return self.node.info(self.id).exit_code

    def output(self) -> list[str]:
        path = self.pod.log_dir / "main.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line.split(" ", 3)[3] for line in lines if line.count(" ") >= 3]

    def stdout(self) -> list[str]:
        path = self.pod.log_dir / "main.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line.split(" ", 3)[3] for line in lines if " stdout " in line]


@pytest.fixture
def run(node: harness.Node) -> Iterator:
    started: list[Run] = []

    def start(command: tuple[str, ...] | list[str] = (), args: tuple[str, ...] | list[str] = (),
              env: dict[str, str] | None = None, user: int = 0) -> Run:
        started.append(Run(node, list(command), list(args), env or {}, user))
        return started[-1]

    yield start
    for container in started:
        node.remove_pod(container.pod)


def test_a_pod_that_sets_nothing_runs_the_runtime_entrypoint_and_cmd(run) -> None:
    container = run()
    assert container.argv() == [*layout().ENTRYPOINT]
    assert container.wait() == 0, container.output()
    out = container.stdout()
    assert out[0].startswith("runtime-entrypoint ") and out[0].endswith("args=" + " ".join(RUNTIME_CMD))
    assert out[1:] == ["default command"]


def test_a_pod_with_only_args_runs_them_through_the_runtime_entrypoint_under_snapshot_init(run) -> None:
    container = run(args=SHOW_PROCESS, env={"DYN_SNAPSHOT_CONTROL_DIR": "/snapshot-control"}, user=65534)
    assert container.wait() == 0, container.output()
    entry, shown = container.stdout()
    assert entry.startswith("runtime-entrypoint ") and "ppid=1 " in entry
    _, pid, ppid, enabled = shown.split()
    # snapshot-init is PID 1 and started the workload above the PIDs a restore pod uses first; the
    # workload helper is importable through the placeholder's PYTHONPATH, even for a non-root user.
    assert int(ppid) == 1 and int(pid) >= 1000
    assert enabled == "True"


def test_a_pod_command_runs_as_written_under_snapshot_init(run) -> None:
    container = run(command=["/usr/local/bin/snapshot-init", "--", *SHOW_PROCESS])
    assert container.wait() == 0, container.output()
    (shown,) = container.stdout()
    assert shown.split()[2] == "1", "snapshot-init must be the parent"


def test_a_restore_pod_stands_by_instead_of_starting_the_runtime(run) -> None:
    container = run(env={"DYN_SNAPSHOT_RESTORE_STANDBY": "1", "DYN_SNAPSHOT_CONTROL_DIR": "/snapshot-control"})
    harness.wait_for(lambda: any("standby" in line for line in container.output()), 60, "snapshot-init standby")
    assert container.node.info(container.id).state == "CONTAINER_RUNNING"
    assert not any("runtime-entrypoint" in line for line in container.output())


def test_the_placeholder_carries_a_working_criu(run) -> None:
    container = run(args=["sleep", "300"])
    harness.wait_for(lambda: container.node.info(container.id).running, 60, "the container to run")
    code, out, err = container.node.exec(container.id, ["criu", "--version"])
    assert code == 0, err
    version = (harness.criu_bundle() / "VERSION").read_text().strip()
    assert f"Version: {version}" in out.decode()
