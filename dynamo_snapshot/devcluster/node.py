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
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog
import yaml

from dynamo_snapshot.devcluster import binaries, service_route
from dynamo_snapshot.devcluster.cluster import Component, LocalCluster, _free_port
from dynamo_snapshot.devcluster.containerd import (
    CGROUPS,
    Containerd,
    _cgroup_root,
    _cni_bin_dir,
    _make_cgroup_tree,
    _unmount_below,
)

log = structlog.get_logger(__name__)

POD_SUBNETS = ipaddress.ip_network("10.100.0.0/14")  # 1024 candidate /24s, clear of SERVICE_CIDR


def routed_networks(route_table: Path = Path("/proc/net/route")) -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination the machine routes today, a DOWN bridge's left-over route included (a new
    pod subnet that overlaps one of them gets "No route to host" for some of its pods)."""
    networks = []
    for line in route_table.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        dest, mask = (ipaddress.IPv4Address(int(f, 16).to_bytes(4, "little")) for f in (fields[1], fields[7]))
        if int(mask):  # the default route overlaps everything and matters for nothing here
            networks.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return networks


def free_subnet(taken: Sequence[ipaddress.IPv4Network], *, tries: int = 64) -> ipaddress.IPv4Network:
    """A random /24 of POD_SUBNETS that overlaps nothing in ``taken``; random so that nodes of concurrent
    sessions, which have not made their bridges yet, still rarely meet."""
    candidates = list(POD_SUBNETS.subnets(new_prefix=24))
    for _ in range(tries):
        subnet = candidates[secrets.randbelow(len(candidates))]
        if not any(subnet.overlaps(net) for net in taken):
            return subnet
    raise RuntimeError(f"no free /24 in {POD_SUBNETS} after {tries} tries: the machine routes {len(taken)} "
                       "networks; remove left-over dsn* bridges (`ip link del <bridge>`)")

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


def node_name() -> str:
    """The kubelet's node name is also the host name the API server dials for logs and exec, so it must
    resolve: this machine's host name when it does (as kubeadm names nodes), else ``localhost``."""
    name = socket.gethostname().lower()
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        return "localhost"
    return name


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
            "subnet": str(free_subnet(routed_networks())),
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

    @property
    def kubelet_root(self) -> Path:
        """The kubelet's --root-dir (its seccomp profiles are under `seccomp/`)."""
        return self.root / "kubelet"

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
                f"--root-dir={self.kubelet_root}",
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
