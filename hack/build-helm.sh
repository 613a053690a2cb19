#!/usr/bin/env bash
# Builds a real helm v3 binary from the Go module proxy with this machine's Go and caches it under
# ~/.cache/dynamo-snapshot/bin/helm-<version>/helm. Re-running with the binary cached is a no-op.
# Prints the binary's path on stdout; progress goes to stderr.
#
# helm.sh/helm/v3 has no replace directives, so `go install pkg@version` builds it directly. The default
# version is the helm 3 line built against the same Kubernetes minor (1.34) as hack/build-k8s.sh.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-3.19.5}"
CACHE="${DYNAMO_SNAPSHOT_CACHE:-$HOME/.cache/dynamo-snapshot}"
OUT="$CACHE/bin/helm-$HELM_VERSION"

NAME=helm
. "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh"
go_tool_cached
go_tool_resolve "helm.sh/helm/v3@v$HELM_VERSION"
modfile="$(go env GOMODCACHE)/cache/download/helm.sh/helm/v3/@v/v$HELM_VERSION.mod"

# helm's own Makefile stamps its version and the Kubernetes version `helm template`/`helm lint` assume
# (Capabilities.KubeVersion); without these, `helm version` says "v3.x-unreleased"-like defaults.
k8s_minor="$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' "$modfile")"
[ -n "$k8s_minor" ] || die "could not read the k8s.io/client-go version from $modfile"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$k8s_minor"
done

go_tool_install "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" "$ldflags" \
  "several minutes on 2 cores; downloads modules on the first run"
