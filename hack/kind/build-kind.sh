#!/usr/bin/env bash
# Builds kind from the Go module proxy with this machine's Go and caches it under
# ~/.cache/dynamo-snapshot/bin/kind-<version>/kind. Re-running with the binary cached is a no-op.
# Prints the binary's path on stdout; progress goes to stderr. Used by hack/kind/e2e.sh.
set -euo pipefail

KIND_VERSION="${KIND_VERSION:-v0.30.0}"
CACHE="${DYNAMO_SNAPSHOT_CACHE:-$HOME/.cache/dynamo-snapshot}"
OUT="$CACHE/bin/kind-$KIND_VERSION"

NAME=kind
. "$(dirname "${BASH_SOURCE[0]}")/../go-tool.sh"
go_tool_cached
go_tool_install "sigs.k8s.io/kind@$KIND_VERSION" "-s -w" "from $(go env GOPROXY)"
