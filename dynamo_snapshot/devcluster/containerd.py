"""containerd for the local node: one instance whose root, state, sockets, runc root, CNI config (the
bridge plugin with host-local IPs) and pod cgroup tree live in one directory, and the clean-up of what a
stopped containerd leaves behind (shims, containers, mounts, cgroups, network namespaces). Used by
``node.KubeletNode`` and, without a kubelet, by the agent's container tests.

Stages, in order:
    configure   ``Containerd.write_config``: config.toml and the CNI network for the bridge and subnet
    run         ``Containerd.component``: the process, as a component of the local cluster
    images      ``import_image``: locally built OCI archives, never pulled
    clean up    ``clean_up``: sandboxes removed, shims killed, the cgroup tree and netns removed
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anyio
import structlog

from dynamo_snapshot.devcluster import service_route
from dynamo_snapshot.devcluster.cluster import ClusterError, Component

log = structlog.get_logger(__name__)

CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
CGROUPS = Path("/sys/fs/cgroup")


class NodeError(ClusterError):
    pass


def _cni_bin_dir() -> str | None:
    """$DYN_SNAPSHOT_CNI_BIN (plugins unpacked elsewhere, as on the GPU machine) or a distribution's place."""
    dirs = (os.environ.get("DYN_SNAPSHOT_CNI_BIN", ""), *CNI_BIN_DIRS)
    return next((d for d in dirs if d and Path(d, "bridge").exists()), None)


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
