"""A real containerd + runc + CNI node for tests and benchmarks, run from a temporary directory.

``Node.start()`` writes a containerd config (root, state, socket, runc root, CNI config and IPAM all
under the directory; ``restrict_oom_score_adj = true``), starts containerd as root, imports the
locally built images with ``ctr -n k8s.io images import`` and talks CRI to it like a kubelet.
``Node.missing()`` says in one line why a machine cannot run it, so tests skip instead of passing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.container.runtime import ContainerInfo, CRIClient
from dynamo_snapshot.agent.pipeline import checkpoint as ckpt
from dynamo_snapshot.agent.pipeline import restore as rst
from dynamo_snapshot.agent.pipeline.containers import ContainerTarget, PlaceholderTarget
from dynamo_snapshot.devcluster import images
from dynamo_snapshot.devcluster.containerd import Containerd

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DYNAMO_SNAPSHOT_CACHE", Path.home() / ".cache" / "dynamo-snapshot"))
CRIU_VERSION = os.environ.get("CRIU_VERSION", "4.2.1")
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
WORKLOADS = Path(__file__).resolve().parent / "workloads"
CONTROL = "/snapshot-control"
COUNTER = ["/usr/local/bin/snapshot-init", "--", "python3", "/opt/workloads/counter.py"]

PAUSE_IMAGE = "localhost/dynamo-snapshot/pause:test"
WORKLOAD_IMAGE = "localhost/dynamo-snapshot/workload:test"
CGROUPS = Path("/sys/fs/cgroup")


def _load_image_builder() -> Any:
    """hack/images/build_images.py, which is a script rather than part of the package."""
    return images.builder()


def criu_bundle() -> Path:
    """The bundle hack/build-criu.sh builds: patched by default, stock with CRIU_PATCHES=none."""
    return criu.cache_dir({**os.environ, criu.CACHE_ENV: str(CACHE)}, CRIU_VERSION) / "bundle"


def missing() -> str | None:
    """One line saying why this machine cannot run the node, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc and CRIU)"
    for tool in ("containerd", "ctr", "runc", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run hack/ci/containers.sh)"
    if not any(Path(d, "bridge").exists() for d in CNI_BIN_DIRS):
        return "CNI plugins are not installed (run hack/ci/containers.sh)"
    if not (criu_bundle() / ".complete").exists():
        return f"CRIU {CRIU_VERSION} is not built in {criu_bundle().parent} (run hack/build-criu.sh)"
    builder = _load_image_builder()
    if (
        builder._cached_layer(
            builder._recipe_version(
                "debian-bookworm-python3", builder.DEBIAN_SUITE, *builder.BASE_PACKAGES, *builder.BASE_TRIM
            ),
            "layer.tar",
        )
        is None
    ):
        return "the base image is not built (run hack/ci/containers.sh)"
    if not Path("/proc/sys/kernel/ns_last_pid").exists():
        return "kernel lacks CONFIG_CHECKPOINT_RESTORE"
    return None


@dataclass
class Pod:
    """A CRI pod sandbox with its config (needed again for CreateContainer)."""

    sandbox_id: str
    config: Any
    name: str
    log_dir: Path
    ip: str = ""
    containers: list[str] = field(default_factory=list)


class Node:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.socket = str(workdir / "containerd.sock")
        self.bridge = "dsnap" + secrets.token_hex(3)
        self.subnet_octet = 100 + secrets.randbelow(100)
        self.cgroup_parent = f"/dynamo-snapshot-tests-{self.bridge}"
        self.containerd = Containerd(workdir, pause_image=PAUSE_IMAGE, metrics_port=None, bridge=self.bridge,
                                     subnet=f"10.{self.subnet_octet}.0.0/24")
        self._proc: subprocess.Popen[bytes] | None = None
        self._portal_cm: Any = None
        self.portal: anyio.from_thread.BlockingPortal | None = None
        self.cri: CRIClient | None = None
        self.pods: list[Pod] = []

    # --- lifecycle -----------------------------------------------------------------------------------

    def _write_config(self) -> Path:
        return self.containerd.write_config()

    def start(self) -> Node:
        config = self._write_config()
        log = (self.workdir / "containerd.log").open("wb")
        self._proc = subprocess.Popen(
            ["containerd", "--config", str(config), "--log-level", "info"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.cri = self.portal.call(self._connect)
        self.import_images()
        return self

    async def _connect(self) -> CRIClient:
        client = CRIClient(self.socket, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"containerd exited ({self._proc.returncode}); see {self.workdir}/containerd.log")
            try:
                await client.version()
                return client
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await anyio.sleep(0.2)  # containerd's socket has no readiness notification

    def ctr(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ctr", "--address", self.socket, "-n", "k8s.io", *args], check=True, capture_output=True, **kw
        )

    def import_images(self) -> None:
        builder = _load_image_builder()
        images = self.workdir / "images"
        images.mkdir()
        pause = builder.oci_archive(images / "pause.tar", PAUSE_IMAGE, [builder.pause_layer()], entrypoint=["/pause"])
        app = builder.app_layer(
            images / "app-layer.tar",
            {f"/opt/workloads/{p.name}": p for p in sorted(WORKLOADS.iterdir()) if p.is_file()},
        )
        workload = builder.oci_archive(
            images / "workload.tar",
            WORKLOAD_IMAGE,
            [builder.base_layer(), app],
            entrypoint=["/usr/local/bin/snapshot-init", "--"],
            cmd=["python3", "/opt/workloads/counter.py"],
        )
        for archive in (pause, workload):
            self.ctr("images", "import", str(archive))
            archive.unlink()

    def stop(self) -> None:
        try:
            if self.cri is not None and self.portal is not None:
                for pod in list(self.pods):
                    with contextlib.suppress(Exception):
                        self.remove_pod(pod)
                self.portal.call(self.cri.close)
        finally:
            if self._portal_cm is not None:
                self._portal_cm.__exit__(None, None, None)
            if self._proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGTERM)
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                    self._proc.wait()
            self.containerd.clean_up(self.cgroup_parent)

    # --- kubelet-like helpers --------------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self.portal is not None
        return self.portal.call(fn, *args)

    def run_pod(self, name: str) -> Pod:
        assert self.cri is not None
        pb = self.cri.pb
        uid = str(uuid.uuid4())
        log_dir = self.workdir / "pod-logs" / f"{name}-{uid[:8]}"
        log_dir.mkdir(parents=True)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
            hostname=name,
            log_directory=str(log_dir),
            labels={"app": name},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"{self.cgroup_parent}/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD),
                ),
            ),
        )
        sandbox_id = self.call(self.cri.run_pod_sandbox, config)
        status = self.call(self.cri.sandbox_status, sandbox_id)
        pod = Pod(sandbox_id=sandbox_id, config=config, name=name, log_dir=log_dir, ip=status.status.network.ip)
        self.pods.append(pod)
        return pod

    def create_container(
        self,
        pod: Pod,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        mounts: dict[str, Path] | None = None,
        start: bool = True,
    ) -> str:
        """An unprivileged container (the runtime's default capabilities, no privilege escalation)."""
        assert self.cri is not None
        pb = self.cri.pb
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=WORKLOAD_IMAGE),
            command=command,
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            mounts=[pb.Mount(container_path=c, host_path=str(h)) for c, h in (mounts or {}).items()],
            log_path=f"{name}.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    privileged=False,
                    no_new_privs=True,
                    namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD),
                ),
            ),
        )
        container_id = self.call(self.cri.create_container, pod.sandbox_id, config, pod.config)
        pod.containers.append(container_id)
        if start:
            self.call(self.cri.start_container, container_id)
        return container_id

    def info(self, container_id: str) -> ContainerInfo:
        assert self.cri is not None
        return self.call(self.cri.container_info, container_id)

    def exec(self, container_id: str, cmd: list[str], timeout_s: int = 10) -> tuple[int, bytes, bytes]:
        assert self.cri is not None
        return self.call(self.cri.exec_sync, container_id, cmd, timeout_s)

    def remove_pod(self, pod: Pod) -> None:
        assert self.cri is not None
        for container_id in pod.containers:
            with contextlib.suppress(Exception):
                self.call(self.cri.stop_container, container_id, 0)
            with contextlib.suppress(Exception):
                self.call(self.cri.remove_container, container_id)
        self.call(self.cri.stop_pod_sandbox, pod.sandbox_id)
        self.call(self.cri.remove_pod_sandbox, pod.sandbox_id)
        self.pods.remove(pod)


@contextlib.contextmanager
def running_node(workdir: Path) -> Iterator[Node]:
    node = Node(workdir)
    try:
        yield node.start()
    finally:
        node.stop()


# --- test helpers ----------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something truthy (for state with no notification to wait on)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Workload:
    """A pod with one snapshot-init container and its control directory on the host."""

    pod: Pod
    container_id: str
    control: Path

    def log(self) -> str:
        path = self.pod.log_dir / "main.log"
        return path.read_text() if path.exists() else ""

    def events(self) -> list[dict]:
        found = []
        for line in self.log().splitlines():
            _, _, payload = line.partition(" stdout F ")
            if payload.startswith("{"):
                found.append(json.loads(payload))
        return found


class Pods:
    def __init__(self, node: Node, workdir: Path):
        self.node = node
        self.workdir = workdir

    def _make(self, name: str, env: dict[str, str], command: list[str]) -> Workload:
        control = self.workdir / f"control-{name}-{uuid.uuid4().hex[:6]}"
        control.mkdir(parents=True)
        pod = self.node.run_pod(name)
        container_id = self.node.create_container(
            pod, "main", command, env={"DYN_SNAPSHOT_CONTROL_DIR": CONTROL, **env}, mounts={CONTROL: control}
        )
        return Workload(pod, container_id, control)

    def counter(self, heap_mib: int = 200, **env: str) -> Workload:
        """A counter source pod, returned once it says ready-for-snapshot."""
        workload = self._make("counter", {"COUNTER_HEAP_MB": str(heap_mib), **env}, COUNTER)
        wait_for(
            lambda: (workload.control / "ready-for-snapshot").exists() or self._exited(workload),
            120,
            "the counter to say ready-for-snapshot",
        )
        assert (workload.control / "ready-for-snapshot").exists(), f"counter exited early:\n{workload.log()}"
        return workload

    def placeholder(self) -> Workload:
        """A restore pod: snapshot-init in standby, same image and command."""
        workload = self._make("placeholder", {"DYN_SNAPSHOT_RESTORE_STANDBY": "1"}, COUNTER)
        wait_for(lambda: "standby" in workload.log(), 60, "the placeholder's snapshot-init to stand by")
        return workload

    def _exited(self, workload: Workload) -> bool:
        return self.node.info(workload.container_id).state == "CONTAINER_EXITED"

    def remove(self, workload: Workload) -> None:
        self.node.remove_pod(workload.pod)


def checkpoint(
    node: Node, bundle: criu.CriuBundle, workload: Workload, base: Path, checkpoint_id: str = "ckpt-test",
    namespace: str = "default",
) -> ckpt.CheckpointResult:
    request = ckpt.CheckpointRequest(checkpoint_id, base, namespace=namespace)
    return node.call(ckpt.checkpoint, ContainerTarget(node.cri, workload.container_id), request, bundle)


def restore(
    node: Node, bundle: criu.CriuBundle, placeholder: Workload, base: Path, checkpoint_id: str = "ckpt-test",
    namespace: str = "default",
) -> rst.RestoreResult:
    request = rst.RestoreRequest(checkpoint_id, base, namespace=namespace)
    return node.call(rst.restore, PlaceholderTarget(node.cri, placeholder.container_id), request, bundle)


def counter_log(node: Node, workload: Workload) -> list[int]:
    """The values the counter appended to /data/counter.log in the container's root filesystem."""
    init = node.info(workload.container_id).pid
    text = (Path("/proc") / str(init) / "root" / "data" / "counter.log").read_text()
    return [int(line) for line in text.splitlines() if line.strip()]
