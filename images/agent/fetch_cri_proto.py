#!/usr/bin/env python3
"""Fetches the CRI api.proto of k8s.io/cri-api from a Go module proxy, without Go (stdlib only).

The agent image generates its CRI stubs at build time (`python -m dynamo_snapshot.agent.container.cri_stubs`),
which finds the proto through Go or Debian's package; the image has neither, so this script downloads
the module zip the way `go mod download` would and hands the proto over (DYN_SNAPSHOT_CRI_PROTO).

    fetch_cri_proto.py --out api.proto [--version v0.34.4] [--goproxy URL[,URL...]]

The version defaults to the one dynamo_snapshot.agent.container.cri_stubs pins; GOPROXY follows Go's syntax (a
comma list, `direct` and `off` end it) and may be a file:// URL, such as $GOMODCACHE/cache/download.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

MODULE = "k8s.io/cri-api"
PROTO_IN_MODULE = "pkg/apis/runtime/v1/api.proto"
DEFAULT_GOPROXY = "https://proxy.golang.org"


def escape(path: str) -> str:
    """Go's module path escaping for proxies: an upper-case letter becomes '!' + its lower case."""
    return "".join(f"!{c.lower()}" if c.isupper() else c for c in path)


def proxies(goproxy: str) -> list[str]:
    found = []
    for entry in goproxy.replace("|", ",").split(","):
        entry = entry.strip().rstrip("/")
        if entry in ("direct", "off"):
            break
        if entry:
            found.append(entry)
    return found


def fetch(version: str, goproxy: str) -> bytes:
    tried = []
    for proxy in proxies(goproxy):
        url = f"{proxy}/{escape(MODULE)}/@v/{escape(version)}.zip"
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                archive = response.read()
        except (urllib.error.URLError, OSError) as err:
            tried.append(f"{url}: {getattr(err, 'reason', err)}")
            continue
        member = f"{MODULE}@{version}/{PROTO_IN_MODULE}"
        try:
            return zipfile.ZipFile(io.BytesIO(archive)).read(member)
        except (KeyError, zipfile.BadZipFile) as err:
            tried.append(f"{url}: no {member} in it ({err})")
    detail = "; ".join(tried) or f"GOPROXY={goproxy!r} names no proxy"
    raise SystemExit(f"fetch_cri_proto: cannot fetch {MODULE}@{version}: {detail} (set GOPROXY to a reachable proxy)")


def pinned_version() -> str:
    from dynamo_snapshot.agent.container.cri_stubs import CRI_API_VERSION

    return CRI_API_VERSION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--version", default="", help="default: the version the CRI stubs module pins")
    parser.add_argument("--goproxy", default=os.environ.get("GOPROXY") or DEFAULT_GOPROXY)
    args = parser.parse_args(argv)
    version = args.version or pinned_version()
    args.out.write_bytes(fetch(version, args.goproxy))
    print(f"{MODULE}@{version} {PROTO_IN_MODULE} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
