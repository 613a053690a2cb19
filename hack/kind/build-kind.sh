#!/usr/bin/env bash
# Builds kind from the Go module proxy with this machine's Go and caches it under
# ~/.cache/dynamo-snapshot/bin/kind-<version>/kind. Re-running with the binary cached is a no-op.
# Prints the binary's path on stdout; progress goes to stderr. Used by hack/kind/e2e.sh.
set -euo pipefail

KIND_VERSION="${KIND_VERSION:-v0.30.0}"
CACHE="${DYNAMO_SNAPSHOT_CACHE:-$HOME/.cache/dynamo-snapshot}"
OUT="$CACHE/bin/kind-$KIND_VERSION"

say() { printf '[build-kind] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ -x "$OUT/kind" ]; then say "cached: $OUT/kind"; echo "$OUT/kind"; exit 0; fi
command -v go >/dev/null || die "Go is not installed (need go on PATH to build kind $KIND_VERSION)"

# Into a scratch directory first: an interrupted build never leaves a binary the cache check accepts.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/build-kind.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
say "go install sigs.k8s.io/kind@$KIND_VERSION (from $(go env GOPROXY))"
CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION" \
  || die "go install sigs.k8s.io/kind@$KIND_VERSION failed (see the Go output above; set KIND_VERSION to one the proxy has)"
mkdir -p "$OUT"
mv "$tmp/kind" "$OUT/kind"
say "built $("$OUT/kind" version 2>/dev/null || echo "kind $KIND_VERSION")"
echo "$OUT/kind"
