#!/usr/bin/env python3
"""Builds the agent and operator images without a Docker engine, laid out as images/agent/Dockerfile and
images/operator/Dockerfile describe (tests/images checks the two agree), as OCI archives for
``ctr images import``.

Layers, bottom up:

1. ``base``: Debian bookworm + python3 (build_images.base_layer, shared with the placeholder; cached);
2. ``deps``: the virtual environment /opt/venv on Debian's /usr/bin/python3 with the project's
   dependencies (pip, from pyproject.toml), and the entry-point scripts; cached under
   ``~/.cache/dynamo-snapshot/images/<version>/``, the version being the hash of the dependency list;
3. (agent) ``criu``: the CRIU bundle of this machine at /usr/local/lib/dynamo-snapshot/criu and
   images/criu/criu.sh as /usr/local/bin/criu;
4. ``app``: the dynamo_snapshot package of this checkout (with the generated CRI stubs) in the venv's
   site-packages, byte-compiled; (operator) the passwd entry of UID 65532 and its home. Built fresh, so
   the images always run the working tree.

Differences from a Docker build, on purpose: the Python is Debian's 3.11 (the Dockerfiles' default base
is python:3.11-slim-bookworm, which no registry here can serve), the agent has no iptables/curl (the
chart's default network lock is nftables, built into the CRIU bundle) and no GPU extras unless asked.

Usage: python_images.py OUT_DIR [--agent-extras gpu]   (writes agent.tar and operator.tar)
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import py_compile
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _build_images():
    name = "dynamo_snapshot_build_images"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "build_images.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


b = _build_images()

VENV = "opt/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"
CRIU_DIR = "usr/local/lib/dynamo-snapshot/criu"
NONROOT = 65532
AGENT_IMAGE = "dynamo-snapshot-agent"
OPERATOR_IMAGE = "dynamo-snapshot-operator"
# The final stages' configuration in images/*/Dockerfile (tests/images/test_python_images.py compares).
AGENT_CONFIG = {"entrypoint": ["snapshot-agent"], "cmd": None, "user": None,
                "env": {"PATH": f"/{VENV}/bin:{b.DEFAULT_PATH}", "PYTHONUNBUFFERED": "1"},
                "labels": {"com.nvidia.dynamo.snapshot.role": "agent"}}
OPERATOR_CONFIG = {"entrypoint": ["dynamo-snapshot", "operator"], "cmd": ["--config=/etc/dynamo-snapshot/config.yaml"],
                   "user": f"{NONROOT}:{NONROOT}",
                   "env": {"PATH": f"/{VENV}/bin:{b.DEFAULT_PATH}", "HOME": "/home/nonroot",
                           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"},
                   "labels": {"com.nvidia.dynamo.snapshot.role": "operator"}}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def app_version() -> str:
    return project()["version"]


def _requirements(extras: tuple[str, ...]) -> list[str]:
    meta = project()
    return [*meta["dependencies"], *(r for extra in extras for r in meta["optional-dependencies"][extra])]


def _script(entry: str) -> bytes:
    module, _, func = entry.partition(":")
    return f"#!/{VENV}/bin/python\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n".encode()


def deps_layer(extras: tuple[str, ...] = ()) -> object:
    """/opt/venv with the dependencies and entry points, on the image's /usr/bin/python3 (cached)."""
    requirements = _requirements(extras)
    scripts = project()["scripts"]
    version = b._recipe_version("venv-deps", *requirements, *sorted(f"{k}={v}" for k, v in scripts.items()))
    cached = b._cached_layer(version, "layer.tar")
    if cached:
        return cached
    work = b.CACHE / "build"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="venv-", dir=work) as tmp:
        root = Path(tmp) / "root"
        site = root / SITE
        b.say(f"pip install --target {SITE}: {' '.join(requirements)}")
        # manylinux/pure wheels for CPython 3.11 on this platform: the image's Python is Debian's 3.11.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(site),
                        "--only-binary=:all:", *requirements], check=True)
        shutil.rmtree(site / "bin", ignore_errors=True)  # pip's own scripts for --target, not ours
        bin_dir = root / VENV / "bin"
        bin_dir.mkdir(parents=True)
        for link in ("python", "python3", "python3.11"):
            (bin_dir / link).symlink_to("/usr/bin/python3.11")
        (root / VENV / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n"
                                                "version = 3.11.2\n")
        for name, entry in scripts.items():
            (bin_dir / name).write_bytes(_script(entry))
            (bin_dir / name).chmod(0o755)
        layer_tmp = Path(tmp) / "layer.tar"
        subprocess.run(["tar", "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-C", str(root),
                        "-cf", str(layer_tmp), "."], check=True)
        return b._store_layer(version, "layer.tar", layer_tmp)


def _tar_tree(tar: tarfile.TarFile, source: Path, arcname: str) -> None:
    def reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    tar.add(str(source), arcname=arcname, filter=reset)


def criu_layer(out: Path) -> object:
    """This machine's CRIU bundle where the agent looks first, and the ``criu`` launcher."""
    from dynamo_snapshot.agent.container.criu import CriuBundle

    bundle = CriuBundle.locate().path
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("usr", "usr/local", "usr/local/lib", "usr/local/lib/dynamo-snapshot", "usr/local/bin"):
            b._add_dir(tar, d)
        _tar_tree(tar, bundle, CRIU_DIR)
        b._add_bytes(tar, "usr/local/bin/criu", (REPO / "images" / "criu" / "criu.sh").read_bytes(), mode=0o755)
    return b._layer(out)


def _package_files() -> list[Path]:
    package = REPO / "dynamo_snapshot"
    return sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix in (".py", ".typed"))


def app_layer(out: Path, *, operator: bool) -> object:
    """dynamo_snapshot from this checkout in site-packages, with unchecked-hash bytecode (valid on a
    read-only root whatever the files' times); the operator's passwd entry and home."""
    from dynamo_snapshot.agent.container import cri_stubs

    cri_stubs.load()  # generates the stubs into the checkout when they are missing, as the agent image does
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        parents = b.parent_dirs(tar)
        for source in _package_files():
            rel = source.relative_to(REPO).as_posix()
            name = f"{SITE}/{rel}"
            parents(name)
            b._add_bytes(tar, name, source.read_bytes())
            if source.suffix == ".py":
                cache_name = f"{SITE}/{Path(rel).parent.as_posix()}/__pycache__/{source.stem}.cpython-311.pyc"
                pyc = Path(tmp) / "out.pyc"
                py_compile.compile(str(source), cfile=str(pyc), dfile=f"/{name}", doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
                parents(cache_name)
                b._add_bytes(tar, cache_name, pyc.read_bytes())
        if operator:
            entry = f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/usr/sbin/nologin\n"
            passwd = _base_file("etc/passwd") + entry
            group = _base_file("etc/group") + f"nonroot:x:{NONROOT}:\n"
            parents("etc/passwd")
            b._add_bytes(tar, "etc/passwd", passwd.encode())
            b._add_bytes(tar, "etc/group", group.encode())
            parents("home/nonroot/x")
            info = tarfile.TarInfo("home/nonroot")
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o755, NONROOT, NONROOT
            tar.addfile(info)
    return b._layer(out)


def _base_file(name: str) -> str:
    with tarfile.open(b.base_layer().path) as tar:
        member = tar.extractfile(f"./{name}")
        assert member is not None
        return io.TextIOWrapper(member).read()


def _oci(out: Path, ref: str, layers: list, config: dict) -> Path:
    return b.oci_archive(out, ref, layers, entrypoint=config["entrypoint"], cmd=config["cmd"], env=config["env"],
                         user=config["user"], labels=config["labels"])


def build(out_dir: Path, *, tag: str | None = None, agent_extras: tuple[str, ...] = ()) -> dict[str, Path]:
    """Both images as OCI archives in ``out_dir``, named as the charts name them by default
    (``dynamo-snapshot-{agent,operator}:<appVersion>``); returns image reference -> archive."""
    tag = tag or app_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = b.base_layer()
    # The names `docker build -t dynamo-snapshot-agent:<tag>` gives, which the charts default to.
    agent_ref, operator_ref = f"docker.io/library/{AGENT_IMAGE}:{tag}", f"docker.io/library/{OPERATOR_IMAGE}:{tag}"
    agent_layers = [base, deps_layer(agent_extras), criu_layer(out_dir / "criu-layer.tar"),
                    app_layer(out_dir / "agent-app-layer.tar", operator=False)]
    operator_layers = [base, deps_layer(), app_layer(out_dir / "operator-app-layer.tar", operator=True)]
    archives = {
        agent_ref: _oci(out_dir / "agent.tar", agent_ref, agent_layers, AGENT_CONFIG),
        operator_ref: _oci(out_dir / "operator.tar", operator_ref, operator_layers, OPERATOR_CONFIG),
    }
    for layer in (*agent_layers[2:], operator_layers[-1]):
        if layer.path.parent == out_dir:
            os.unlink(layer.path)
    return archives


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tag", default=None, help="image tag (default: the project's version)")
    parser.add_argument("--agent-extras", default="", help="pip extras of the agent, e.g. gpu")
    args = parser.parse_args()
    extras = tuple(e for e in args.agent_extras.split(",") if e)
    for ref, archive in build(args.out_dir, tag=args.tag, agent_extras=extras).items():
        b.say(f"{ref}: {archive} ({archive.stat().st_size >> 20} MiB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
