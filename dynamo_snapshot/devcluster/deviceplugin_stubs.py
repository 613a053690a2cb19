"""Python stubs for the kubelet device plugin API (v1beta1), generated from the k8s.io/kubelet Go module's
api.proto (Go module cache or proxy, or $DYN_SNAPSHOT_DEVICEPLUGIN_PROTO) into ``_deviceplugin/`` (ignored
by git), the way ``agent.container.cri_stubs`` makes the CRI stubs; ``load()`` generates them when missing."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

MODULE = "k8s.io/kubelet"
VERSION = os.environ.get("DYN_SNAPSHOT_KUBELET_API_VERSION", "v0.34.4")
_PROTO_IN_MODULE = Path("pkg/apis/deviceplugin/v1beta1/api.proto")
_PACKAGE_DIR = Path(__file__).resolve().parent / "_deviceplugin"
_PACKAGE = "dynamo_snapshot.devcluster._deviceplugin"
_PROTO_NAME = "deviceplugin_v1beta1.proto"


class StubsUnavailable(RuntimeError):
    pass


def find_proto() -> Path:
    explicit = os.environ.get("DYN_SNAPSHOT_DEVICEPLUGIN_PROTO")
    if explicit:
        return Path(explicit)
    go = shutil.which("go")
    if go is None:
        raise StubsUnavailable(f"no Go to fetch {MODULE}@{VERSION}; set DYN_SNAPSHOT_DEVICEPLUGIN_PROTO")
    try:
        cache = subprocess.run([go, "env", "GOMODCACHE"], check=True, capture_output=True, text=True).stdout.strip()
        module_dir = Path(cache) / f"{MODULE}@{VERSION}"
        if not (module_dir / _PROTO_IN_MODULE).is_file():
            out = subprocess.run([go, "mod", "download", "-json", f"{MODULE}@{VERSION}"], check=True,
                                 capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout
            module_dir = Path(json.loads(out)["Dir"])
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as err:
        raise StubsUnavailable(f"cannot fetch {MODULE}@{VERSION} through Go: {err}") from err
    return module_dir / _PROTO_IN_MODULE


def generate(proto: Path | None = None) -> Path:
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise StubsUnavailable("device plugin stubs are missing and grpcio-tools is not installed") from exc
    proto = proto or find_proto()
    with tempfile.TemporaryDirectory(prefix="dp-stubs-", dir=_PACKAGE_DIR.parent) as tmp:
        rel = Path(*_PACKAGE.split(".")) / _PROTO_NAME
        include, out = Path(tmp) / "include", Path(tmp) / "out"
        (include / rel).parent.mkdir(parents=True)
        out.mkdir()
        shutil.copyfile(proto, include / rel)
        if protoc.main(["protoc", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(include / rel)]) != 0:
            raise StubsUnavailable(f"protoc failed on {proto}")
        generated = out / Path(*_PACKAGE.split("."))
        (generated / "__init__.py").write_text(f'"""Generated from {MODULE}@{VERSION}; not committed."""\n')
        old = Path(tmp) / "old"
        if _PACKAGE_DIR.exists():
            _PACKAGE_DIR.rename(old)
        shutil.move(str(generated), _PACKAGE_DIR)
    return _PACKAGE_DIR


def load() -> tuple[ModuleType, ModuleType]:
    """(messages, services), generating them first when missing."""
    if not (_PACKAGE_DIR / "deviceplugin_v1beta1_pb2_grpc.py").is_file():
        generate()
    importlib.invalidate_caches()
    stem = _PROTO_NAME.removesuffix(".proto")
    return importlib.import_module(f"{_PACKAGE}.{stem}_pb2"), importlib.import_module(f"{_PACKAGE}.{stem}_pb2_grpc")


if __name__ == "__main__":
    print(generate())
