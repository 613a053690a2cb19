#!/usr/bin/env python3
"""Builds the container images the node-machinery tests run, without a registry or a Docker engine.

Layers are plain tar files; ``oci_archive`` packs layers and a config into an OCI image-layout tarball
that ``ctr -n k8s.io images import`` accepts (``oci_layout``: several images in one, layers shared).
Two layers are expensive and cached under
``~/.cache/dynamo-snapshot/images/<version>/`` (the version is the recipe's hash, so a recipe change
rebuilds them):

* ``base``: Debian bookworm minbase with python3, from debootstrap (needs root and deb.debian.org);
* ``pause``: a static pause binary for the pod sandbox, compiled from ``pause.c``.

The application layer (``snapshot-init`` from this checkout plus test workloads) is small and built
fresh by the caller with ``app_layer``, so tests always run the code in the working tree.

Usage: build_images.py [base|pause|all]   (prints the cached layer paths)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("DYNAMO_SNAPSHOT_CACHE", Path.home() / ".cache" / "dynamo-snapshot")) / "images"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("DYN_SNAPSHOT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3",)
# Paths removed from the debootstrap tree: documentation and package indexes nothing at runtime reads.
BASE_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# snapshot-init and the workload helper live here in the image, importable without the agent's deps.
APP_PREFIX = "opt/dynamo-snapshot"


def say(msg: str) -> None:
    print(f"[build-images] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Layer:
    path: Path
    digest: str  # sha256:<hex> of the uncompressed tar, which is also its diff ID
    size: int


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _layer(path: Path) -> Layer:
    return Layer(path=path, digest=_sha256_file(path), size=path.stat().st_size)


def _recipe_version(name: str, *parts: str | bytes) -> str:
    h = hashlib.sha256(name.encode())
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
    return f"{name}-{h.hexdigest()[:12]}"


def _cached_layer(version: str, filename: str) -> Layer | None:
    path = CACHE / version / filename
    meta = CACHE / version / (filename + ".json")
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        return Layer(path=path, digest=info["digest"], size=info["size"])
    return None


def _store_layer(version: str, filename: str, built: Path) -> Layer:
    out_dir = CACHE / version
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = _layer(built)
    final = out_dir / filename
    os.replace(built, final)
    meta_tmp = out_dir / (filename + ".json.tmp")
    meta_tmp.write_text(json.dumps({"digest": layer.digest, "size": layer.size}))
    os.replace(meta_tmp, out_dir / (filename + ".json"))
    return Layer(path=final, digest=layer.digest, size=layer.size)


def base_layer() -> Layer:
    """Debian bookworm minbase + python3 as one layer (cached)."""
    version = _recipe_version("debian-bookworm-python3", DEBIAN_SUITE, *BASE_PACKAGES, *BASE_TRIM)
    cached = _cached_layer(version, "layer.tar")
    if cached:
        return cached
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise SystemExit("[build-images] error: debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise SystemExit("[build-images] error: debootstrap needs root")
    work = CACHE / "build"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=work) as tmp:
        rootfs = Path(tmp) / "rootfs"
        say(f"debootstrap {DEBIAN_SUITE} (minbase + {', '.join(BASE_PACKAGES)}) from {DEBIAN_MIRROR}")
        log = Path(tmp) / "debootstrap.log"
        with log.open("wb") as out:
            rc = subprocess.run(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    DEBIAN_SUITE,
                    str(rootfs),
                    DEBIAN_MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
        if rc != 0:
            sys.stderr.write(log.read_text(errors="replace")[-4000:])
            raise SystemExit(f"[build-images] error: debootstrap failed ({rc})")
        for rel in BASE_TRIM:
            target = rootfs / rel
            if target.is_dir():
                for child in target.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        layer_tmp = Path(tmp) / "layer.tar"
        say("packing the base layer")
        # /dev is a tmpfs in every container; device nodes from debootstrap would only be noise.
        subprocess.run(
            [
                "tar",
                "--numeric-owner",
                "--sort=name",
                "--exclude=./dev/*",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "-C",
                str(rootfs),
                "-cf",
                str(layer_tmp),
                ".",
            ],
            check=True,
        )
        return _store_layer(version, "layer.tar", layer_tmp)


def pause_layer() -> Layer:
    """A static pause binary at /pause (cached)."""
    source = (HERE / "pause.c").read_bytes()
    version = _recipe_version("pause", source)
    cached = _cached_layer(version, "layer.tar")
    if cached:
        return cached
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("[build-images] error: no C compiler (apt-get install gcc libc6-dev)")
    work = CACHE / "build"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pause-", dir=work) as tmp:
        binary = Path(tmp) / "pause"
        say("compiling pause")
        subprocess.run([cc, "-static", "-O2", "-o", str(binary), str(HERE / "pause.c")], check=True)
        layer_tmp = Path(tmp) / "layer.tar"
        with tarfile.open(layer_tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            info = tar.gettarinfo(str(binary), arcname="pause")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755
            with binary.open("rb") as f:
                tar.addfile(info, f)
        return _store_layer(version, "layer.tar", layer_tmp)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def parent_dirs(tar: tarfile.TarFile):
    """A function that adds the directories above a member's name to ``tar``, each once."""
    dirs: set[str] = set()

    def ensure(name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                _add_dir(tar, d)

    return ensure


SNAPSHOT_INIT_LAUNCHER = f"""#!/usr/bin/python3
# snapshot-init: PID 1 of the placeholder image (dynamo_snapshot.workload.init).
import sys
sys.path.insert(0, "/{APP_PREFIX}")
from dynamo_snapshot.workload.init import main
sys.exit(main())
""".encode()


def app_layer(out: Path, extra_files: dict[str, Path] | None = None) -> Layer:
    """snapshot-init and dynamo_snapshot.workload from this checkout, plus ``extra_files``
    (image path -> local file). The workload package is stdlib-only, so an empty
    ``dynamo_snapshot/__init__.py`` stands in for the full package."""
    workload = REPO / "dynamo_snapshot" / "workload"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        ensure_parents = parent_dirs(tar)

        pkg = f"{APP_PREFIX}/dynamo_snapshot"
        ensure_parents(f"{pkg}/workload/x")
        _add_bytes(tar, f"{pkg}/__init__.py", b"")
        for src in sorted(workload.glob("*.py")):
            _add_bytes(tar, f"{pkg}/workload/{src.name}", src.read_bytes())
        ensure_parents("usr/local/bin/snapshot-init")
        _add_bytes(tar, "usr/local/bin/snapshot-init", SNAPSHOT_INIT_LAUNCHER, mode=0o755)
        for image_path, local in sorted((extra_files or {}).items()):
            name = image_path.lstrip("/")
            ensure_parents(name)
            _add_bytes(tar, name, local.read_bytes(), mode=local.stat().st_mode & 0o777)
    return _layer(out)


def oci_archive(
    out: Path,
    ref: str,
    layers: list[Layer],
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
    user: str | None = None,
    labels: dict[str, str] | None = None,
) -> Path:
    """Write an OCI image-layout tarball holding one linux/amd64-or-host image named ``ref``."""
    image = oci_image(ref, layers, entrypoint=entrypoint, cmd=cmd, env=env, user=user, labels=labels)
    return oci_layout(out, [image])


@dataclass(frozen=True)
class OciImage:
    """One image of an OCI layout: its config and manifest blobs, its index entry and its layers."""

    config: bytes
    manifest: bytes
    index_entry: dict
    layers: tuple[Layer, ...]


def _blob(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_image(
    ref: str,
    layers: list[Layer],
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
    user: str | None = None,
    labels: dict[str, str] | None = None,
) -> OciImage:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    environment = {"PATH": DEFAULT_PATH, **(env or {})}
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [f"{k}={v}" for k, v in environment.items()],
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "WorkingDir": "/",
            **({"User": user} if user else {}),
            **({"Labels": labels} if labels else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _blob(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    entry = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _blob(manifest_bytes),
        "size": len(manifest_bytes),
        "annotations": {
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
        },
        "platform": {"architecture": arch, "os": "linux"},
    }
    return OciImage(config=config_bytes, manifest=manifest_bytes, index_entry=entry, layers=tuple(layers))


def oci_layout(out: Path, images: list[OciImage]) -> Path:
    """Write an OCI image-layout tarball holding ``images``; a layer they share is stored once."""
    index = {"schemaVersion": 2, "manifests": [image.index_entry for image in images]}
    tmp = out.with_name(out.name + ".tmp")
    written: set[str] = set()
    with tarfile.open(tmp, "w") as tar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(tar, "index.json", json.dumps(index).encode())
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        for image in images:
            for data in (image.config, image.manifest):
                digest = _blob(data)
                if digest not in written:
                    written.add(digest)
                    _add_bytes(tar, f"blobs/sha256/{digest.split(':')[1]}", data)
            for layer in image.layers:
                if layer.digest not in written:
                    written.add(layer.digest)
                    tar.add(str(layer.path), arcname=f"blobs/sha256/{layer.digest.split(':')[1]}")
    os.replace(tmp, out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["base", "pause", "all"])
    args = parser.parse_args()
    if args.what in ("base", "all"):
        layer = base_layer()
        say(f"base layer: {layer.path} ({layer.size >> 20} MiB, {layer.digest[:19]})")
    if args.what in ("pause", "all"):
        layer = pause_layer()
        say(f"pause layer: {layer.path} ({layer.size >> 10} KiB, {layer.digest[:19]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
