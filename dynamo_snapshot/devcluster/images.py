"""The local node's images, built without a registry (hack/images/build_images.py) as OCI archives for
``ctr images import``: the pod sandbox's pause image and a placeholder image (Debian + python3,
snapshot-init as entrypoint, ``dynamo_snapshot.workload`` and the counter worker from this checkout)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "hack" / "images" / "build_images.py"
PYTHON_BUILDER = REPO / "hack" / "images" / "python_images.py"
PAUSE_IMAGE = "localhost/dynamo-snapshot/pause:node"
PLACEHOLDER_IMAGE = "localhost/dynamo-snapshot/placeholder:node"
WORKER_PATH = "/opt/workloads/counter_worker.py"
WORKER_COMMAND = ["python3", WORKER_PATH]


def builder() -> Any:
    """hack/images/build_images.py: a script of the repository, not part of the package."""
    return _script_module("dynamo_snapshot_build_images", BUILDER)


def python_builder() -> Any:
    """hack/images/python_images.py: the agent and operator images (the installed mode)."""
    return _script_module("dynamo_snapshot_python_images", PYTHON_BUILDER)


def _script_module(name: str, path: Path) -> Any:
    if name in sys.modules:
        return sys.modules[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the local node needs a checkout of the repository")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def base_layer_missing() -> str | None:
    """Why the cached base layer cannot be used (building it needs root and the Debian mirror), or None."""
    b = builder()
    version = b._recipe_version("debian-bookworm-python3", b.DEBIAN_SUITE, *b.BASE_PACKAGES, *b.BASE_TRIM)
    if b._cached_layer(version, "layer.tar") is None:
        return "the placeholder base image is not built (run hack/ci/containers.sh)"
    return None


def build(workdir: Path, extra_files: dict[str, Path] | None = None) -> list[Path]:
    """The pause and placeholder images as OCI archives in ``workdir``; ``extra_files`` (image path ->
    local file) are added to the placeholder, next to the counter worker."""
    b = builder()
    workdir.mkdir(parents=True, exist_ok=True)
    pause = b.oci_archive(workdir / "pause.tar", PAUSE_IMAGE, [b.pause_layer()], entrypoint=["/pause"])
    files = {WORKER_PATH: Path(__file__).with_name("counter_worker.py"), **(extra_files or {})}
    app = b.app_layer(workdir / "app-layer.tar", files)
    placeholder = b.oci_archive(
        workdir / "placeholder.tar",
        PLACEHOLDER_IMAGE,
        [b.base_layer(), app],
        entrypoint=["/usr/local/bin/snapshot-init", "--"],
        cmd=WORKER_COMMAND,
    )
    return [pause, placeholder]
