#!/usr/bin/env python3
"""Builds the kind node image of `make e2e` offline: no registry, no `kind build node-image` (its base
image and the control-plane images come from registries). Needs root, debootstrap, the Debian mirror,
a Docker engine, and the Kubernetes binaries of hack/build-k8s.sh (with kubeadm and kube-proxy).

Stages (each cached under ~/.cache/dynamo-snapshot/kind-node/, keyed by what goes into it):

1. ``debian``: a debootstrap bookworm minbase with systemd, containerd and runc, iptables/nftables, the
   CNI plugins - Debian's packages for what kind's base image builds from source;
2. ``rootfs``: that tree made a kind node: kind's own base-image files (entrypoint, kubelet units, mount
   helpers) from the kind module this kind is built from, a containerd config of ours (containerd 1.6,
   ``restrict_oom_score_adj``: these machines lack CAP_SYS_RESOURCE), kubeadm/kubelet/kubectl, a bridge
   CNI network (one node: no kindnetd), a StorageClass, and the control-plane images (kube-apiserver,
   kube-controller-manager, kube-scheduler, kube-proxy, etcd, pause: our binaries on the Debian base
   layer of hack/images) in one OCI archive that a oneshot unit imports before the kubelet starts;
3. ``import``: `docker import` of the packed tree with the entrypoint, env and stop signal kind's node
   image has, tagged ``dynamo-snapshot/kind-node:<k8s version>-<key>``.

Prints the image name on stdout. Usage: node_image.py [--k8s-bin DIR] [--kind-version vX.Y.Z]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("DYNAMO_SNAPSHOT_CACHE", Path.home() / ".cache" / "dynamo-snapshot"))
K8S_VERSION = os.environ.get("K8S_VERSION", "1.34.4")
KIND_VERSION = os.environ.get("KIND_VERSION", "v0.30.0")
# etcd is ours (hack/build-k8s.sh's ETCD_VERSION), not kubeadm's default: kind-config.yaml sets the tag.
ETCD_TAG = os.environ.get("ETCD_IMAGE_TAG", "3.6.4-0")
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.1"
POD_SUBNET = "10.244.0.0/24"
PACKAGES = (
    "systemd", "conntrack", "iptables", "nftables", "iproute2", "ethtool", "util-linux", "mount", "kmod",
    "libseccomp2", "pigz", "bash", "ca-certificates", "procps", "jq", "containerd", "runc",
    "containernetworking-plugins",
)
# What kube-proxy's image needs beyond the Debian base layer: the netfilter tools and their libraries.
NETFILTER_PACKAGES = ("iptables", "nftables", "conntrack")
CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")
NODE_BINARIES = ("kubeadm", "kubelet", "kubectl")
ARCHIVE = "kind/images/control-plane.tar"


def say(msg: str) -> None:
    print(f"[node-image] {msg}", file=sys.stderr, flush=True)


def _images_builder():
    spec = importlib.util.spec_from_file_location("dynamo_snapshot_build_images", REPO / "hack/images/build_images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), **{"check": True, **kw})


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def kind_base_files() -> Path:
    """kind's base-image files (images/base/files) of the kind module in Go's module cache."""
    gomodcache = run("go", "env", "GOMODCACHE", capture_output=True, text=True).stdout.strip()
    files = Path(gomodcache) / f"sigs.k8s.io/kind@{KIND_VERSION}/images/base/files"
    if not files.is_dir():
        run("go", "mod", "download", f"sigs.k8s.io/kind@{KIND_VERSION}", stdout=subprocess.DEVNULL)
    if not (files / "usr/local/bin/entrypoint").is_file():
        raise SystemExit(f"[node-image] error: {files} has no usr/local/bin/entrypoint (kind {KIND_VERSION})")
    return files


def node_key(k8s_bin: Path, kind_files: Path) -> str:
    """What the node image is made of: this script, the package list, kind's files, the binaries."""
    parts: list[str | bytes] = [Path(__file__).read_bytes(), K8S_VERSION, ETCD_TAG, *PACKAGES]
    for f in sorted(p for p in kind_files.rglob("*") if p.is_file()):
        parts += [str(f.relative_to(kind_files)), f.read_bytes()]
    for name in (*CONTROL_PLANE, *NODE_BINARIES, "etcd"):
        st = (k8s_bin / name).stat()
        parts.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
    return _digest(*parts)


def debian_tree(out: Path) -> None:
    """The debootstrap tree of PACKAGES, unpacked into ``out`` from its cached tarball."""
    tarball = CACHE / "kind-node" / f"debian-bookworm-{_digest(*PACKAGES)}.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        mirror = os.environ.get("DYN_SNAPSHOT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
        with tempfile.TemporaryDirectory(prefix="debian-", dir=tarball.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            say(f"debootstrap bookworm ({len(PACKAGES)} packages) from {mirror}: a few minutes")
            log = Path(tmp) / "debootstrap.log"
            with log.open("wb") as f:
                rc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                                     "bookworm", str(rootfs), mirror], stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                sys.stderr.write(log.read_text(errors="replace")[-4000:])
                raise SystemExit(f"[node-image] error: debootstrap failed ({rc})")
            run("tar", "--numeric-owner", "-C", str(rootfs), "--exclude=./dev/*", "--exclude=./proc/*",
                "--exclude=./sys/*", "-cf", str(Path(tmp) / "debian.tar"), ".")
            os.replace(Path(tmp) / "debian.tar", tarball)
    out.mkdir(parents=True)
    run("tar", "--numeric-owner", "-C", str(out), "-xf", str(tarball))


def containerd_config() -> str:
    """containerd 1.6 (Debian's), as kind's base configures containerd 2 - plus restrict_oom_score_adj."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  tolerate_missing_hugepages_controller = true
  # These machines lack CAP_SYS_RESOURCE: a negative oom_score_adj cannot be set, so clamp it.
  restrict_oom_score_adj = true
[{cri}.containerd]
  discard_unpacked_layers = true
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  base_runtime_spec = "/etc/containerd/cri-base.json"
  [{cri}.containerd.runtimes.runc.options]
    SystemdCgroup = true
[{cri}.cni]
  bin_dir = "/opt/cni/bin"
  conf_dir = "/etc/cni/net.d"
"""


def cni_network() -> dict:
    """One node, so one bridge: pods get addresses of POD_SUBNET, the node is their gateway."""
    return {"cniVersion": "0.4.0", "name": "kind-bridge", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ]}


STORAGE_CLASS = """# The node image's default StorageClass: no provisioner (no registry for one); hack/kind/e2e.sh
# creates a hostPath PersistentVolume bound to the claim it needs.
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: Immediate
reclaimPolicy: Retain
"""

PRELOAD_UNIT = f"""[Unit]
Description=Import the control-plane images of the offline node image (hack/kind/node_image.py)
After=containerd.service
Requires=containerd.service
Before=kubelet.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/ctr -n k8s.io images import /{ARCHIVE}

[Install]
WantedBy=multi-user.target
"""


def _copy_tree(src: Path, dst: Path, mode: int) -> None:
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        target.chmod(mode)


def kind_files_into(rootfs: Path, files: Path) -> None:
    """What kind's base Dockerfile copies and runs, on the Debian tree."""
    _copy_tree(files / "usr/local/bin", rootfs / "usr/local/bin", 0o755)
    _copy_tree(files / "kind", rootfs / "kind", 0o644)
    _copy_tree(files / "kind/bin", rootfs / "kind/bin", 0o755)
    _copy_tree(files / "etc", rootfs / "etc", 0o644)
    for wants in ("lib/systemd/system/multi-user.target.wants", "lib/systemd/system/local-fs.target.wants",
                  "lib/systemd/system/basic.target.wants", *(str(p.relative_to(rootfs)) for p in
                                                             (rootfs / "etc/systemd/system").glob("*.wants"))):
        for link in (rootfs / wants).glob("*"):
            link.unlink()
    for pattern in ("sockets.target.wants/*udev*", "sockets.target.wants/*initctl*",
                    "sysinit.target.wants/systemd-tmpfiles-setup.service"):
        for link in (rootfs / "lib/systemd/system").glob(pattern):
            link.unlink()
    with (rootfs / "etc/systemd/journald.conf").open("a") as f:
        f.write("ReadKMsg=no\n")
    _symlink("/lib/systemd/systemd", rootfs / "sbin/init")
    (rootfs / "etc/kubernetes/manifests").mkdir(parents=True, exist_ok=True)


def _symlink(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def runtime_into(rootfs: Path) -> None:
    """Debian's containerd, runc and CNI plugins where kind's units and our config look for them."""
    for name in ("containerd", "ctr", "containerd-shim-runc-v2"):
        _symlink(f"/usr/bin/{name}", rootfs / "usr/local/bin" / name)
    for plugin in sorted((rootfs / "usr/lib/cni").iterdir()):
        _symlink(f"/usr/lib/cni/{plugin.name}", rootfs / "opt/cni/bin" / plugin.name)
    (rootfs / "etc/containerd/config.toml").write_text(containerd_config())
    spec = json.loads(run("ctr", "oci", "spec", capture_output=True, text=True).stdout)
    spec.setdefault("hooks", {}).setdefault("createContainer", []).append({"path": "/kind/bin/mount-product-files.sh"})
    spec["process"].pop("rlimits", None)
    (rootfs / "etc/containerd/cri-base.json").write_text(json.dumps(spec, indent=2))
    net_d = rootfs / "etc/cni/net.d"
    net_d.mkdir(parents=True, exist_ok=True)
    (net_d / "10-kind-bridge.conflist").write_text(json.dumps(cni_network(), indent=2))


def kubernetes_into(rootfs: Path, k8s_bin: Path, work: Path) -> None:
    for name in NODE_BINARIES:
        shutil.copyfile(k8s_bin / name, rootfs / "usr/bin" / name)
        (rootfs / "usr/bin" / name).chmod(0o755)
    (rootfs / "kind/version").write_text(f"v{K8S_VERSION}\n")
    (rootfs / "kind/manifests").mkdir(parents=True, exist_ok=True)
    (rootfs / "kind/manifests/default-storage.yaml").write_text(STORAGE_CLASS)
    (rootfs / "etc/systemd/system/dynamo-snapshot-preload.service").write_text(PRELOAD_UNIT)
    control_plane_archive(rootfs, k8s_bin, work, rootfs / ARCHIVE)
    for unit in ("kubelet.service", "containerd.service", "undo-mount-hacks.service",
                 "dynamo-snapshot-preload.service"):
        run("systemctl", f"--root={rootfs}", "enable", unit, stderr=subprocess.DEVNULL)
    run("systemctl", f"--root={rootfs}", "mask", "systemd-binfmt.service", stderr=subprocess.DEVNULL)


def _files_layer(b, out: Path, root: Path, paths: list[str]) -> object:
    """A layer of ``paths`` (relative, as they are in ``root``: files, symlinks, their directories)."""
    listing = out.with_suffix(".list")
    listing.write_text("".join(f"./{p}\n" for p in sorted(set(paths))))
    run("tar", "--numeric-owner", "--no-recursion", "-C", str(root), "-cf", str(out), "-T", str(listing))
    listing.unlink()
    return b._layer(out)


def _with_parents(paths: list[str]) -> list[str]:
    out = set(paths)
    for p in paths:
        parts = p.split("/")[:-1]
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(out)


def _link_chain(rootfs: Path, path: str) -> list[str]:
    """``path`` and every link on the way to its file, resolved inside ``rootfs`` (relative paths)."""
    chain = []
    for _ in range(40):
        parent = os.path.dirname(path)
        real_parent = os.path.relpath(os.path.realpath(rootfs / parent), rootfs) if parent else ""
        if parent and real_parent != parent and not real_parent.startswith(".."):
            chain.append(parent)  # e.g. lib64 -> usr/lib64 (a relative link)
            path = os.path.join(real_parent, os.path.basename(path))
        chain.append(path)
        full = rootfs / path
        if not full.is_symlink():
            return chain
        target = os.readlink(full)
        path = os.path.normpath(target.lstrip("/") if target.startswith("/") else os.path.join(parent, target))
    raise SystemExit(f"[node-image] error: {path}: too many symlinks")


def netfilter_paths(rootfs: Path) -> list[str]:
    """The files of NETFILTER_PACKAGES in ``rootfs``, the shared libraries they load, the alternatives
    links that name iptables (Debian's postinst makes them, dpkg does not list them)."""
    listed = run("chroot", str(rootfs), "dpkg", "-L", *NETFILTER_PACKAGES, capture_output=True, text=True).stdout
    files = [p.lstrip("/") for p in listed.splitlines() if p.startswith("/") and not p.startswith("/usr/share")]
    files = [p for p in files if (rootfs / p).is_symlink() or (rootfs / p).is_file()]
    elves = [f"/{p}" for p in files if not (rootfs / p).is_symlink() and (rootfs / p).read_bytes()[:4] == b"\x7fELF"]
    ldd = run("chroot", str(rootfs), "ldd", *elves, capture_output=True, text=True, check=False).stdout
    # "\tlibx.so.1 => /lib/.../libx.so.1 (0x...)" or "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
    libs = {part for line in ldd.splitlines() if line.startswith("\t")
            for part in line.split() if part.startswith("/")}
    for lib in sorted(libs):
        files += _link_chain(rootfs, lib.lstrip("/"))
    for alt in (rootfs / "etc/alternatives").glob("*tables*"):
        files.append(str(alt.relative_to(rootfs)))
    for link in (rootfs / "usr/sbin").glob("*tables*"):
        files.append(str(link.relative_to(rootfs)))
    return _with_parents(files)


def control_plane_archive(rootfs: Path, k8s_bin: Path, work: Path, out: Path) -> None:
    """The images kubeadm runs, named as kubeadm names them, in one archive (the base layer once)."""
    b = _images_builder()
    base = b.base_layer()
    images = [b.oci_image(PAUSE_IMAGE, [b.pause_layer()], entrypoint=["/pause"])]
    netfilter = _files_layer(b, work / "netfilter.tar", rootfs, netfilter_paths(rootfs))
    for name in (*CONTROL_PLANE, "etcd"):
        staging = work / f"{name}-root"
        (staging / "usr/local/bin").mkdir(parents=True)
        shutil.copyfile(k8s_bin / name, staging / "usr/local/bin" / name)
        (staging / "usr/local/bin" / name).chmod(0o755)
        layer = _files_layer(b, work / f"{name}.tar", staging, _with_parents([f"usr/local/bin/{name}"]))
        tag = ETCD_TAG if name == "etcd" else f"v{K8S_VERSION}"
        layers = [base, netfilter, layer] if name == "kube-proxy" else [base, layer]
        images.append(b.oci_image(f"registry.k8s.io/{name}:{tag}", layers, entrypoint=[f"/usr/local/bin/{name}"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    b.oci_layout(out, images)
    say(f"control-plane images: {', '.join(i.index_entry['annotations']['io.containerd.image.name'] for i in images)}"
        f" ({out.stat().st_size >> 20} MiB)")


def node_tarball(k8s_bin: Path, kind_files: Path, key: str) -> Path:
    tarball = CACHE / "kind-node" / key / "node.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="node-", dir=tarball.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        debian_tree(rootfs)
        say("making it a kind node")
        kind_files_into(rootfs, kind_files)
        runtime_into(rootfs)
        kubernetes_into(rootfs, k8s_bin, Path(tmp))
        for trash in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / trash, ignore_errors=True)
        say("packing the node tree")
        run("tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(Path(tmp) / "node.tar"), ".")
        os.replace(Path(tmp) / "node.tar", tarball)
    for old in tarball.parent.parent.iterdir():  # older recipes' trees: a GiB each
        if old.is_dir() and old != tarball.parent:
            shutil.rmtree(old, ignore_errors=True)
    return tarball


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k8s-bin", type=Path, default=CACHE / "bin" / f"k8s-{K8S_VERSION}")
    args = parser.parse_args()
    missing = [n for n in (*CONTROL_PLANE, *NODE_BINARIES, "etcd") if not (args.k8s_bin / n).is_file()]
    if missing:
        raise SystemExit(f"[node-image] error: {args.k8s_bin} lacks {', '.join(missing)} "
                         "(run K8S_EXTRA_BINARIES='kubeadm kube-proxy' hack/build-k8s.sh)")
    kind_files = kind_base_files()
    key = node_key(args.k8s_bin, kind_files)
    image = f"dynamo-snapshot/kind-node:v{K8S_VERSION}-{key}"
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
        say(f"cached: {image}")
    else:
        tarball = node_tarball(args.k8s_bin, kind_files, key)
        say(f"docker import {tarball} ({tarball.stat().st_size >> 20} MiB) as {image}")
        run("docker", "import", str(tarball), f"{image}-rootfs", stdout=subprocess.DEVNULL)
        # `docker import --change` knows no STOPSIGNAL; the classic builder needs no registry for this.
        dockerfile = (f"FROM {image}-rootfs\nENV container=docker\nSTOPSIGNAL SIGRTMIN+3\n"
                      'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]\n')
        built = subprocess.run(["docker", "build", "-q", "-t", image, "-"], input=dockerfile.encode(),
                               capture_output=True, env={**os.environ, "DOCKER_BUILDKIT": "0"})
        if built.returncode != 0:
            raise SystemExit(f"[node-image] error: docker build of {image} failed: {built.stderr.decode()[-2000:]}")
        run("docker", "rmi", f"{image}-rootfs", stdout=subprocess.DEVNULL)
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
