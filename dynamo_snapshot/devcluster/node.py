"""A real worker node for the local control plane: containerd + runc + the bridge CNI plugin and a real
kubelet (v1.34, built by hack/build-k8s.sh next to the control plane), all in one directory.

    cluster = LocalCluster(root).start()
    with KubeletNode(cluster).running(images.build(root / "images")) as node:  # imported, registered, Ready
        node.name                                       # the Node object's name
        node.cri_socket                                 # for the snapshot agent

containerd and the kubelet are components of the cluster (``LocalCluster.add_component``), so they are
started, restarted and stopped like the control plane. What a stopped containerd leaves behind (shims,
containers, mounts, cgroups, the bridge) is removed by ``KubeletNode.stop``.

The node registers with a client certificate for ``system:node:<name>`` in ``system:nodes`` (the Node
authorizer applies to it), serves the kubelet API with a certificate from the cluster CA (so ``kubectl
logs`` works), runs pods in a cgroup tree of its own (``cgroupRoot``) with the cgroupfs driver, and keeps
pod logs under its directory. Images are never pulled: ``start`` imports the locally built ones (OCI
archives, ``devcluster/images.py``) into containerd, and pods use ``imagePullPolicy: IfNotPresent``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
import yaml

from dynamo_snapshot.devcluster import binaries, service_route
from dynamo_snapshot.devcluster.cluster import ClusterError, Component, LocalCluster, _free_port

log = structlog.get_logger(__name__)

CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
CGROUPS = Path("/sys/fs/cgroup")


class NodeError(ClusterError):
    pass


def missing() -> str | None:
    """One line saying why this machine cannot run a node, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc and the kubelet run as root)"
    for tool in ("containerd", "ctr", "runc", "nsenter"):  # `ip` only cleans up (absent on some GPU machines)
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run hack/ci/containers.sh)"
    if _cni_bin_dir() is None:
        return "the CNI plugins are not installed (run hack/ci/containers.sh)"
    kubelet = binaries.bin_dir() / "kubelet"
    if not os.access(kubelet, os.X_OK):
        return f"no kubelet in {binaries.bin_dir()} (run hack/build-k8s.sh)"
    if not (CGROUPS / "freezer").is_dir() and not (CGROUPS / "cgroup.controllers").exists():
        return "no freezer cgroup (cgroup v1 without the freezer controller)"
    return None


def _cni_bin_dir() -> str | None:
    """$DYN_SNAPSHOT_CNI_BIN (plugins unpacked elsewhere, as on the GPU machine) or a distribution's place."""
    dirs = (os.environ.get("DYN_SNAPSHOT_CNI_BIN", ""), *CNI_BIN_DIRS)
    return next((d for d in dirs if d and Path(d, "bridge").exists()), None)


def node_name() -> str:
    """The kubelet's node name is also the host name the API server dials for logs and exec, so it must
    resolve: this machine's host name when it does (as kubeadm names nodes), else ``localhost``."""
    name = socket.gethostname().lower()
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        return "localhost"
    return name


class Containerd:
    """One containerd instance whose root, state, sockets, runc root, CNI config and IP allocations all
    live in ``root``; pods get a bridge network (``bridge`` + ``host-local``, no iptables). The metrics
    endpoint, when there is a port for it, doubles as the health check."""

    def __init__(self, root: Path, *, pause_image: str, metrics_port: int | None, bridge: str, subnet: str):
        self.root = root
        self.socket = root / "containerd.sock"
        self.pause_image = pause_image
        self.metrics_port = metrics_port
        self.bridge = bridge
        self.subnet = subnet

    def write_config(self) -> Path:
        cni_bin = _cni_bin_dir()
        net_d = self.root / "cni" / "net.d"
        net_d.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": "dynamo-snapshot-node",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.root / "cni" / "ipam")},
            }],
        }
        (net_d / "10-bridge.conflist").write_text(json.dumps(conflist))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        metrics = f"127.0.0.1:{self.metrics_port}" if self.metrics_port else ""
        config = f"""version = 2
root = "{self.root}/root"
state = "{self.root}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = "{self.root}/debug.sock"
[metrics]
  address = "{metrics}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.root}/opt"
[{cri}]
  sandbox_image = "{self.pause_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        Root = "{self.root}/runc"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{net_d}"
"""
        path = self.root / "config.toml"
        path.write_text(config)
        return path

    def component(self) -> Component:
        config = self.write_config()
        return Component(
            "containerd",
            lambda: ["containerd", "--config", str(config), "--log-level", "info"],
            lambda: f"http://127.0.0.1:{self.metrics_port}/v1/metrics",
        )

    def ctr(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
                                capture_output=True, timeout=300)
        if result.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
        return result

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    async def _remove_sandboxes(self) -> None:
        from dynamo_snapshot.agent.container.runtime import CRIClient, CRIError

        async with CRIClient(str(self.socket), timeout=10) as cri:
            for sandbox in await cri.list_pod_sandboxes():
                with contextlib.suppress(CRIError):
                    await cri.stop_pod_sandbox(sandbox.id)  # tears down the pod network and its netns
                    await cri.remove_pod_sandbox(sandbox.id)

    def remove_sandboxes(self) -> None:
        """Stop and remove every pod sandbox through CRI, as a drained kubelet would (containerd must run)."""
        try:
            anyio.run(self._remove_sandboxes)
        except Exception as err:  # a dead containerd: clean_up removes what is left the hard way
            log.warning("could not remove pod sandboxes through CRI", socket=str(self.socket), error=str(err))

    def clean_up(self, cgroup_root: str) -> None:
        """Remove what a stopped containerd leaves: shims, container processes, mounts, cgroups, the pods'
        network namespaces (when they were not torn down through CRI), the bridge."""
        _kill_shims(str(self.socket))
        _kill_cgroup_tree(cgroup_root)
        _unmount_below(self.root)
        _remove_network_namespaces(self.subnet)
        service_route.remove(self.bridge)
        if shutil.which("ip"):
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _kill_shims(socket_path: str) -> None:
    # Shims outlive containerd by design; only ours name this instance's socket on their command line.
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and socket_path.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _kill_cgroup_tree(cgroup_root: str) -> None:
    """SIGKILL every process below ``cgroup_root`` in every hierarchy, then remove the cgroups."""
    hierarchies = [CGROUPS] if (CGROUPS / "cgroup.controllers").exists() else [
        h for h in CGROUPS.iterdir() if (h / "cgroup.procs").exists()]
    trees = [h / cgroup_root.lstrip("/") for h in hierarchies]
    for tree in trees:
        if not tree.exists():
            continue
        for procs in tree.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    for tree in trees:
        if not tree.exists():
            continue
        directories = sorted((d for d in tree.rglob("*") if d.is_dir()), key=lambda d: len(d.parts))
        for directory in [*reversed(directories), tree]:
            for _ in range(50):  # a killed task leaves its cgroup asynchronously; nothing to wait on
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def _remove_network_namespaces(subnet: str) -> None:
    """containerd pins each pod's network namespace at /var/run/netns/cni-*; a pod killed without CNI
    teardown leaves it. Ours are those holding an address of this node's (random) subnet."""
    network = ipaddress.ip_network(subnet, strict=False)
    if shutil.which("ip") is None:
        return
    for pinned in Path("/var/run/netns").glob("cni-*"):
        shown = subprocess.run(["nsenter", f"--net={pinned}", "ip", "-o", "-4", "addr", "show"],
                               capture_output=True, text=True)
        addresses = [word.partition("/")[0] for line in shown.stdout.splitlines()
                     for prev, word in zip(line.split(), line.split()[1:], strict=False) if prev == "inet"]
        if any(ipaddress.ip_address(a) in network for a in addresses):
            subprocess.run(["umount", str(pinned)], capture_output=True)
            with contextlib.suppress(OSError):
                pinned.unlink()


def _cgroup_root(bridge: str) -> str:
    return f"/dynamo-snapshot-node-{bridge}"


def _make_cgroup_tree(cgroup_root: str) -> None:
    """The kubelet wants its ``cgroupRoot`` to exist in every hierarchy before it starts."""
    if (CGROUPS / "cgroup.controllers").exists():
        (CGROUPS / cgroup_root.lstrip("/")).mkdir(exist_ok=True)
        return
    for hierarchy in CGROUPS.iterdir():
        if not (hierarchy / "cgroup.procs").exists():
            continue
        directory = hierarchy / cgroup_root.lstrip("/")
        directory.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            # A v1 cpuset cgroup starts with no CPUs and memory nodes: give it the parent's.
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not (directory / name).read_text().strip():
                    (directory / name).write_text((hierarchy / name).read_text())


def _unmount_below(root: Path) -> None:
    prefix = str(root) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mountpoint in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


class KubeletNode:
    """containerd and a kubelet registered with ``cluster`` as node ``name``."""

    def __init__(self, cluster: LocalCluster, *, name: str | None = None, root: Path | None = None,
                 pause_image: str = "localhost/dynamo-snapshot/pause:node", route_api_server: bool = False,
                 gpu_plugin: list[str] | None = None):
        self.cluster = cluster
        # Pods reach the API server at the kubernetes Service (service_route.py): for in-cluster clients.
        self.route_api_server = route_api_server
        # Arguments of the GPU device plugin (devcluster/gpu_plugin.py) when the node offers nvidia.com/gpu.
        self.gpu_plugin = gpu_plugin
        self.name = name or node_name()
        self.root = (root or cluster.root / "node").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = self._settings()
        self.ports = self.settings["ports"]
        self.pause_image = pause_image
        self.containerd = Containerd(self.root / "containerd", pause_image=pause_image,
                                     metrics_port=self.ports["containerd-metrics"],
                                     bridge=self.settings["bridge"], subnet=self.settings["subnet"])
        self.containerd.root.mkdir(parents=True, exist_ok=True)
        # The node's pods live in a cgroup tree of their own, so a stop can find and remove all of them.
        self.cgroup_root = _cgroup_root(self.settings["bridge"])
        self._attached = False

    @property
    def cri_socket(self) -> Path:
        return self.containerd.socket

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    def _settings(self) -> dict[str, Any]:
        """Ports, bridge and subnet, chosen once per node directory (a restarted node keeps them); random,
        so that nodes of concurrent sessions on one machine do not collide."""
        path = self.root / "node.json"
        if path.exists():
            return json.loads(path.read_text())
        settings = {
            "ports": {name: _free_port()
                      for name in ("kubelet", "kubelet-healthz", "containerd-metrics", "gpu-plugin")},
            "bridge": "dsn" + secrets.token_hex(3),
            "subnet": f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}.0/24",
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        tmp.replace(path)
        return settings

    # -- kubelet configuration ------------------------------------------------------------------------------
    def _kubelet_files(self) -> tuple[Path, Path]:
        pki = self.root / "pki"
        ca = self.cluster.ca
        serving = ca.issue(f"kubelet-serving-{self.name}", f"system:node:{self.name}",
                           orgs=("system:nodes",), server_names=(self.name, "localhost", "127.0.0.1"),
                           client=False)
        kubeconfig = self.cluster.kubeconfig_for(f"system:node:{self.name}", groups=("system:nodes",))
        pki.mkdir(exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["kubelet-healthz"],
            "tlsCertFile": str(serving.cert),
            "tlsPrivateKeyFile": str(serving.key),
            "authentication": {"x509": {"clientCAFile": str(ca.pair.cert)}, "webhook": {"enabled": False},
                               "anonymous": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},  # only the API server (a CA-signed client) gets in
            "containerRuntimeEndpoint": f"unix://{self.containerd.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            # These machines run cgroup v1, which kubelet 1.34 still supports when asked.
            "failCgroupV1": False,
            "failSwapOn": False,
            "podLogsDir": str(self.pod_logs),
            "volumePluginDir": str(self.root / "volume-plugins"),  # not /usr/libexec on the host
            "resolvConf": "/etc/resolv.conf",
            # A development node on a shared disk: never evict pods or collect the imported images.
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "registerNode": True,
            "serializeImagePulls": False,
        }
        path = self.root / "kubelet-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path, kubeconfig

    def _kubelet_component(self) -> Component:
        config, kubeconfig = self._kubelet_files()
        binary = binaries.bin_dir() / "kubelet"
        return Component(
            "kubelet",
            lambda: [
                str(binary),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--root-dir={self.root / 'kubelet'}",
                f"--cert-dir={self.root / 'pki'}",
                "--v=1",
            ],
            lambda: f"http://127.0.0.1:{self.ports['kubelet-healthz']}/healthz",
        )

    def _gpu_plugin_component(self) -> Component:
        import sys

        from dynamo_snapshot.devcluster import gpu_plugin as gpu_plugin_module

        port = self.ports["gpu-plugin"]
        argv = [sys.executable, "-m", "dynamo_snapshot.devcluster.gpu_plugin",
                f"--device-plugin-dir={gpu_plugin_module.KUBELET_DEVICE_PLUGIN_DIR}", f"--health-port={port}",
                *(self.gpu_plugin or [])]
        return Component("gpu-plugin", lambda: argv, lambda: f"http://127.0.0.1:{port}/healthz")

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def attach(self) -> KubeletNode:
        """Register containerd and the kubelet as components of the cluster (does not start them)."""
        if not self._attached:
            self.cluster.add_component(self.containerd.component())
            self.cluster.add_component(self._kubelet_component())
            if self.gpu_plugin is not None:
                self.cluster.add_component(self._gpu_plugin_component())
            self._attached = True
        return self

    def start(self, images: Sequence[Path] = (), ready_timeout: float = 120.0) -> KubeletNode:
        """Start containerd, import ``images`` (OCI archives), start the kubelet, wait for Node Ready."""
        self.attach()
        try:
            if self.route_api_server:
                service_route.install(self.settings["bridge"], self.cluster.ports["kube-apiserver"])
            self.cluster.start_component("containerd")
            for archive in images:
                self.containerd.import_image(archive)
            _make_cgroup_tree(self.cgroup_root)
            self.cluster.start_component("kubelet")
            self.cluster.kubectl("wait", f"node/{self.name}", "--for=create", f"--timeout={int(ready_timeout)}s")
            self.cluster.kubectl("wait", f"node/{self.name}", "--for=condition=Ready",
                                 f"--timeout={int(ready_timeout)}s")
            if self.gpu_plugin is not None:
                self.cluster.start_component("gpu-plugin")
                self.cluster.kubectl("wait", f"node/{self.name}",
                                     r"--for=jsonpath={.status.allocatable.nvidia\.com/gpu}",
                                     f"--timeout={int(ready_timeout)}s")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the kubelet and containerd and remove everything the node's pods left on the host."""
        if self._attached:
            if self.gpu_plugin is not None:
                self.cluster.stop_component("gpu-plugin")
            self.cluster.stop_component("kubelet")
            if self.cluster.running("containerd"):
                self.containerd.remove_sandboxes()
            self.cluster.stop_component("containerd")
        self.containerd.clean_up(self.cgroup_root)
        _unmount_below(self.root)
        _remove_container_log_links(self.pod_logs)

    @contextlib.contextmanager
    def running(self, images: Sequence[Path] = ()) -> Iterator[KubeletNode]:
        self.start(images)
        try:
            yield self
        finally:
            self.stop()

    def log_tail(self, component: str = "kubelet", lines: int = 40) -> str:
        path = self.cluster.root / "logs" / f"{component}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _remove_container_log_links(pod_logs: Path) -> None:
    """The kubelet links every container log into /var/log/containers (a fixed path); drop ours."""
    links = Path("/var/log/containers")
    if not links.is_dir():
        return
    for link in links.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(pod_logs) + "/"):
                link.unlink()


def clean_up_after(directory: Path) -> list[Path]:
    """Remove what the nodes below ``directory`` left on the host once their processes were killed
    (``make stop`` after ``dynamo-snapshot demo --keep``): shims, pods, mounts, cgroups, bridges, log
    links. Returns the node directories cleaned."""
    cleaned = []
    # Absolute: mountinfo and the shims' command lines name absolute paths (a relative one matched nothing).
    for settings_file in sorted(Path(directory).resolve().rglob("node.json")):
        node_dir = settings_file.parent
        settings = json.loads(settings_file.read_text())
        containerd = Containerd(node_dir / "containerd", pause_image="", metrics_port=None,
                                bridge=settings["bridge"], subnet=settings["subnet"])
        containerd.clean_up(_cgroup_root(settings["bridge"]))
        _unmount_below(node_dir)
        _remove_container_log_links(node_dir / "pod-logs")
        cleaned.append(node_dir)
    return cleaned


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "clean":
        sys.exit("usage: python -m dynamo_snapshot.devcluster.node clean DIRECTORY")
    for done in clean_up_after(Path(sys.argv[2])):
        print(f"cleaned up the node in {done}")
