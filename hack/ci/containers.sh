#!/usr/bin/env bash
# Installs and builds everything the container tests (pytest -m containers) need, on a fresh Debian
# bookworm machine, as root. Idempotent; with everything in place it only checks and returns.
#
#   apt:    containerd 1.6 + runc + CNI plugins (the tests start their own containerd in a temporary
#           directory), nftables (CRIU's network lock), util-linux (nsenter), debootstrap, and CRIU's
#           build dependencies
#   build:  CRIU 4.2.1 (hack/build-criu.sh), the base and pause image layers
#           (hack/images/build_images.py), the CRI stubs (dynamo_snapshot/agent/container/_cri, not committed)
#
# PYTHON selects the interpreter that has the project installed (default: .venv/bin/python if present).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
say() { printf '[containers] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages; containerd, runc and CRIU need root)"
command -v apt-get >/dev/null || die "needs a Debian-based machine (apt-get not found)"

PACKAGES=(
  containerd runc containernetworking-plugins nftables iproute2 util-linux debootstrap
  ca-certificates curl xz-utils python3
  gcc make libc6-dev pkg-config protobuf-c-compiler protobuf-compiler libprotobuf-dev libprotobuf-c-dev
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libnftables-dev libaio-dev uuid-dev
)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "packages: all present"
fi

"$REPO/hack/build-criu.sh" >/dev/null
python3 "$REPO/hack/images/build_images.py" all

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
if "$PYTHON" -c 'import grpc_tools' 2>/dev/null; then
  (cd "$REPO" && "$PYTHON" -m dynamo_snapshot.agent.container.cri_stubs >/dev/null)
  say "CRI stubs: $REPO/dynamo_snapshot/agent/container/_cri"
else
  say "grpcio-tools is not installed for $PYTHON; the CRI stubs will be generated on first use"
fi
say "ready"
