"""Where the locally built control-plane binaries live (hack/build-k8s.sh puts them there)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

K8S_VERSION = "1.34.4"
REQUIRED = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


class MissingBinaries(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAMO_SNAPSHOT_CACHE", Path.home() / ".cache" / "dynamo-snapshot"))


def bin_dir() -> Path:
    override = os.environ.get("DYNAMO_SNAPSHOT_K8S_BIN")
    return Path(override) if override else cache_dir() / "bin" / f"k8s-{K8S_VERSION}"


def require(names: tuple[str, ...] = REQUIRED) -> Path:
    """The binary directory, or a clear error naming what is missing and how to build it."""
    directory = bin_dir()
    missing = [n for n in names if not os.access(directory / n, os.X_OK)]
    if missing:
        hint = "run hack/build-k8s.sh (needs Go and the Go module proxy)"
        if shutil.which("go") is None:
            hint = "install Go (>= 1.24), then run hack/build-k8s.sh"
        raise MissingBinaries(f"missing {', '.join(missing)} in {directory}: {hint}")
    return directory
