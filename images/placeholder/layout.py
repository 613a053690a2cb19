#!/usr/bin/env python3
"""Writes the files the placeholder image adds to a runtime image, into a directory tree (stdlib only).

images/placeholder/Dockerfile runs this in a build stage and copies the tree onto the runtime image;
the no-Docker build in tests does the same, so both produce the same files:

    /usr/local/bin/snapshot-init                  launcher: the image's Python runs dynamo_snapshot.workload.init
    /opt/dynamo-snapshot/dynamo_snapshot/...      the workload helper package (stdlib only)
    /opt/dynamo-snapshot/runtime-command.json     the runtime image's ENTRYPOINT and CMD (see below)
    /usr/local/lib/dynamo-snapshot/criu/          the CRIU bundle (images/criu/build.sh), with --criu-bundle
    /usr/local/bin/criu                           runs the bundle, with --criu-bundle
    /usr/local/bin/cuda-checkpoint                with --cuda-checkpoint

Why runtime-command.json: the placeholder's ENTRYPOINT is snapshot-init, and setting ENTRYPOINT drops the
runtime image's own ENTRYPOINT and CMD from the image config. A pod that sets only `args` (or nothing)
must still run the runtime's normal entrypoint, so the build records both (read from the runtime image
by images/placeholder/build.sh) and `snapshot-init --runtime-entrypoint [ARG...]` puts them back:
ENTRYPOINT + ARGs, or ENTRYPOINT + CMD when the container gives no args.

    layout.py --out DIR --source REPO --runtime-image IMAGE \\
              --runtime-entrypoint JSON --runtime-cmd JSON [--criu-bundle DIR] [--cuda-checkpoint PATH|URL]

JSON is what `docker image inspect -f '{{json .Config.Entrypoint}}'` prints: a list of strings, or null.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The image config the Dockerfile sets; tests check the Dockerfile says the same.
APP_DIR = "/opt/dynamo-snapshot"
SNAPSHOT_INIT = "/usr/local/bin/snapshot-init"
RUNTIME_ENTRYPOINT_FLAG = "--runtime-entrypoint"
ENTRYPOINT = [SNAPSHOT_INIT, RUNTIME_ENTRYPOINT_FLAG]
CMD: list[str] = []
RUNTIME_COMMAND_FILE = f"{APP_DIR}/runtime-command.json"
CRIU_BUNDLE_DIR = "/usr/local/lib/dynamo-snapshot/criu"
CRIU_WRAPPER = HERE.parent / "criu" / "criu.sh"

# A POSIX shell launcher, so the placeholder works with whichever Python 3 the runtime image has (a
# venv's, /usr/local's, Debian's). `exec` keeps one process: the interpreter is the container's PID 1.
# -I: the runtime's PYTHONPATH or a stray dynamo_snapshot in the working directory never shadows ours.
LAUNCHER = f"""#!/bin/sh
# snapshot-init: PID 1 of the placeholder image (dynamo_snapshot.workload.init, stdlib only).
py="${{DYN_SNAPSHOT_PYTHON:-}}"
if [ -z "$py" ]; then
  for candidate in python3 /usr/bin/python3 /usr/local/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
  done
fi
if [ -z "$py" ]; then
  echo "snapshot-init: no python3 in this image (PATH=$PATH): the placeholder needs Python >= 3.9;" \\
       "set DYN_SNAPSHOT_PYTHON to its path" >&2
  exit 127
fi
exec "$py" -I -c '
import sys
sys.path.insert(0, "{APP_DIR}")
from dynamo_snapshot.workload.init import main
sys.exit(main())' "$@"
"""

# dynamo_snapshot/__init__.py of the image. extend_path keeps a full dynamo_snapshot installed in the
# runtime's own site-packages importable next to this stdlib-only part of it.
PACKAGE_INIT = """\"\"\"The placeholder image's part of dynamo-snapshot: the workload helper and snapshot-init.\"\"\"

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
"""


class LayoutError(ValueError):
    pass


# Which field of `docker image inspect` each flag takes, for the error that says how to get it.
_INSPECT_FIELD = {"--runtime-entrypoint": "Entrypoint", "--runtime-cmd": "Cmd"}


def parse_command(flag: str, raw: str) -> list[str]:
    """A JSON list of strings, or null (the runtime image has none)."""
    if not raw.strip():
        inspect = "docker image inspect -f '{{json .Config." + _INSPECT_FIELD.get(flag, "Cmd") + "}}' IMAGE"
        raise LayoutError(
            f"{flag} is empty: pass the runtime image's value as JSON (what `{inspect}` prints), "
            "or null when it has none; make placeholder-image does this"
        )
    try:
        value = json.loads(raw)
    except ValueError:
        raise LayoutError(f"{flag} {raw!r} is not JSON: pass a list of strings such as [\"python3\"], or null") \
            from None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LayoutError(f"{flag} {raw!r} must be a JSON list of strings, or null")
    return value


def pythonpath(runtime_value: str | None) -> str:
    """PYTHONPATH of the placeholder: the runtime's, then ours (what the Dockerfile's ENV line computes)."""
    return f"{runtime_value}:{APP_DIR}" if runtime_value else APP_DIR


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _fetch(source: str, sha256: str) -> bytes:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=120) as response:
            data = response.read()
    else:
        data = Path(source).read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise LayoutError(f"{source}: SHA-256 is {hashlib.sha256(data).hexdigest()}, expected {sha256}")
    return data


def write_tree(
    out: Path,
    source: Path,
    runtime_image: str,
    runtime_entrypoint: list[str],
    runtime_cmd: list[str],
    criu_bundle: Path | None = None,
    cuda_checkpoint: str = "",
    cuda_checkpoint_sha256: str = "",
) -> Path:
    workload = source / "dynamo_snapshot" / "workload"
    if not (workload / "init.py").is_file():
        raise LayoutError(f"{workload}/init.py is missing: --source must be a dynamo-snapshot checkout")
    app = out / APP_DIR.lstrip("/")
    _write(app / "dynamo_snapshot" / "__init__.py", PACKAGE_INIT.encode())
    for module in sorted(workload.glob("*.py")):
        _write(app / "dynamo_snapshot" / "workload" / module.name, module.read_bytes())
    recorded = {"image": runtime_image, "entrypoint": runtime_entrypoint, "cmd": runtime_cmd}
    _write(out / RUNTIME_COMMAND_FILE.lstrip("/"), (json.dumps(recorded, indent=2) + "\n").encode())
    _write(out / SNAPSHOT_INIT.lstrip("/"), LAUNCHER.encode(), 0o755)
    if criu_bundle is not None:
        if not (criu_bundle / ".complete").is_file():
            raise LayoutError(f"{criu_bundle} is not a complete CRIU bundle (build it with images/criu/build.sh)")
        target = out / CRIU_BUNDLE_DIR.lstrip("/")
        shutil.copytree(criu_bundle, target, symlinks=True, dirs_exist_ok=True)
        _write(out / "usr/local/bin/criu", CRIU_WRAPPER.read_bytes(), 0o755)
    if cuda_checkpoint:
        _write(out / "usr/local/bin/cuda-checkpoint", _fetch(cuda_checkpoint, cuda_checkpoint_sha256), 0o755)
    for path in [out, *out.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=HERE.parents[1], help="the dynamo-snapshot checkout")
    parser.add_argument("--runtime-image", required=True)
    parser.add_argument("--runtime-entrypoint", required=True)
    parser.add_argument("--runtime-cmd", required=True)
    parser.add_argument("--criu-bundle", type=Path)
    parser.add_argument("--cuda-checkpoint", default="", help="path or http(s) URL of the cuda-checkpoint binary")
    parser.add_argument("--cuda-checkpoint-sha256", default="")
    args = parser.parse_args(argv)
    try:
        if not args.runtime_image.strip():
            raise LayoutError("--runtime-image is empty: pass the runtime image the placeholder wraps (RUNTIME_IMAGE)")
        write_tree(
            args.out,
            args.source,
            args.runtime_image,
            parse_command("--runtime-entrypoint", args.runtime_entrypoint),
            parse_command("--runtime-cmd", args.runtime_cmd),
            args.criu_bundle,
            args.cuda_checkpoint,
            args.cuda_checkpoint_sha256,
        )
    except LayoutError as err:
        print(f"layout.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
