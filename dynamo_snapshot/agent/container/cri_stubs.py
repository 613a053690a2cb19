"""Python stubs for the Kubernetes CRI (runtime.v1), generated at build time, never committed.

The proto comes from the k8s.io/cri-api Go module (through the Go module cache or the Go module
proxy) or from Debian's golang-github-kubernetes-cri-api-dev; grpcio-tools turns it into
``dynamo_snapshot/agent/container/_cri/`` (ignored by git). ``hack/ci/containers.sh`` runs the build step;
``load()`` runs it lazily when the stubs are missing and says what to install when it cannot.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from dynamo_snapshot.agent.errors import AgentError

CRI_API_MODULE = "k8s.io/cri-api"
CRI_API_VERSION = os.environ.get("DYN_SNAPSHOT_CRI_API_VERSION", "v0.34.4")
_PROTO_IN_MODULE = Path("pkg/apis/runtime/v1/api.proto")
_DEBIAN_PROTO = Path("/usr/share/gocode/src/k8s.io/cri-api") / _PROTO_IN_MODULE

_PACKAGE_DIR = Path(__file__).resolve().parent / "_cri"
_PACKAGE = "dynamo_snapshot.agent.container._cri"
# The proto is copied under this name so the generated modules import each other by package path.
_PROTO_NAME = "runtime_v1.proto"


class CRIStubsUnavailable(AgentError):
    """The CRI stubs are not generated and cannot be generated here."""


def _go_module_dir() -> Path | None:
    go = shutil.which("go")
    if go is None:
        return None
    try:
        modcache = subprocess.run([go, "env", "GOMODCACHE"], check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    cached = Path(modcache) / f"{CRI_API_MODULE}@{CRI_API_VERSION}"
    if (cached / _PROTO_IN_MODULE).is_file():
        return cached
    try:
        out = subprocess.run(
            [go, "mod", "download", "-json", f"{CRI_API_MODULE}@{CRI_API_VERSION}"],
            check=True,
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
        ).stdout
        return Path(json.loads(out)["Dir"])
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        return None


def find_proto() -> Path:
    """Locate the CRI api.proto: $DYN_SNAPSHOT_CRI_PROTO, the Go module, or Debian's package."""
    explicit = os.environ.get("DYN_SNAPSHOT_CRI_PROTO")
    if explicit:
        if not Path(explicit).is_file():
            raise CRIStubsUnavailable(f"DYN_SNAPSHOT_CRI_PROTO={explicit} is not a file")
        return Path(explicit)
    module_dir = _go_module_dir()
    if module_dir is not None and (module_dir / _PROTO_IN_MODULE).is_file():
        return module_dir / _PROTO_IN_MODULE
    if _DEBIAN_PROTO.is_file():
        return _DEBIAN_PROTO
    raise CRIStubsUnavailable(
        f"cannot find the CRI api.proto: install Go (for `go mod download {CRI_API_MODULE}@{CRI_API_VERSION}`)"
        " or golang-github-kubernetes-cri-api-dev, or set DYN_SNAPSHOT_CRI_PROTO"
    )


def generate(proto: Path | None = None) -> Path:
    """Generate the stubs into the ignored package directory, replacing it atomically."""
    try:
        from grpc_tools import protoc  # build-time only dependency
    except ImportError as exc:
        raise CRIStubsUnavailable(
            "CRI stubs are not generated and grpcio-tools is not installed; "
            "run hack/ci/containers.sh or `pip install grpcio-tools`"
        ) from exc
    proto = proto or find_proto()
    with tempfile.TemporaryDirectory(prefix="cri-stubs-", dir=_PACKAGE_DIR.parent) as tmp:
        include = Path(tmp) / "include"
        rel_proto = Path(*_PACKAGE.split(".")) / _PROTO_NAME
        (include / rel_proto).parent.mkdir(parents=True)
        shutil.copyfile(proto, include / rel_proto)
        out = Path(tmp) / "out"
        out.mkdir()
        grpc_include = Path(protoc.__file__).resolve().parent / "_proto"
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{include}",
                f"-I{grpc_include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(include / rel_proto),
            ]
        )
        if rc != 0:
            raise CRIStubsUnavailable(f"protoc failed ({rc}) on {proto}")
        generated = out / Path(*_PACKAGE.split("."))
        (generated / "__init__.py").write_text(
            f'"""Generated from {CRI_API_MODULE}@{CRI_API_VERSION} by cri_stubs.generate(); not committed."""\n'
        )
        staged = Path(tmp) / "_cri"
        shutil.move(str(generated), staged)
        old = Path(tmp) / "_cri.old"
        if _PACKAGE_DIR.exists():
            _PACKAGE_DIR.rename(old)
        staged.rename(_PACKAGE_DIR)
    return _PACKAGE_DIR


def load() -> tuple[ModuleType, ModuleType]:
    """Return (messages, services) modules, generating them first if they are missing."""
    if not (_PACKAGE_DIR / "runtime_v1_pb2_grpc.py").is_file():
        generate()
    importlib.invalidate_caches()
    try:
        messages = importlib.import_module(f"{_PACKAGE}.runtime_v1_pb2")
        services = importlib.import_module(f"{_PACKAGE}.runtime_v1_pb2_grpc")
    except ImportError as exc:
        raise CRIStubsUnavailable(
            f"generated CRI stubs in {_PACKAGE_DIR} do not import ({exc}); delete the directory and "
            "re-run hack/ci/containers.sh"
        ) from exc
    return messages, services


def main() -> int:
    path = generate()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
