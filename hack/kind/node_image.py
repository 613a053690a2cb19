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
    return subprocess.run(list(cmd), check=True, **kw)


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
