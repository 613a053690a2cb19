#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet, kubectl) from the Go module proxy with this machine's Go, and caches the binaries under
# ~/.cache/dynamo-snapshot/bin/k8s-<version>/. Re-running with everything cached is a no-op.
# K8S_EXTRA_BINARIES="kubeadm kube-proxy" adds the kind node image's (hack/kind/build-node-image.sh).
#
# k8s.io/kubernetes is not `go install`-able (its go.mod replaces the k8s.io/* staging modules with
# local paths), so we build it from a small wrapper module that requires it and replaces every
# staging module with its published v0.x.y tag.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.4}"
CACHE="${DYNAMO_SNAPSHOT_CACHE:-$HOME/.cache/dynamo-snapshot}"
OUT="$CACHE/bin/k8s-$K8S_VERSION"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl ${K8S_EXTRA_BINARIES:-})
# Every command tools.go imports (so go.sum covers them all), built or not.
COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kubeadm kube-proxy)

say() { printf '[build-k8s] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

command -v go >/dev/null || die "Go is not installed (need go >= 1.24 on PATH)"

missing=()
for b in "${BINARIES[@]}" etcd; do [ -x "$OUT/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then say "cached: $OUT"; echo "$OUT"; exit 0; fi
say "building ${missing[*]} (kubernetes v$K8S_VERSION, etcd v$ETCD_VERSION) into $OUT"

work="$CACHE/build/k8s-$K8S_VERSION"
mkdir -p "$work/etcd" "$OUT"
minor="${K8S_VERSION#1.}"      # 34.4 -> v0.34.4

cd "$work"
if [ ! -f go.mod ]; then
  say "resolving k8s.io/kubernetes v$K8S_VERSION from $(go env GOPROXY)"
  go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" >/dev/null \
    || die "the Go module proxy did not serve k8s.io/kubernetes@v$K8S_VERSION"
  modfile="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$K8S_VERSION.mod"
  {
    echo "module local/k8sbuild"
    echo "go 1.24.0"
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    grep -E '^\s+k8s\.io/[^ ]+ => \./staging' "$modfile" | awk -v v="v0.$minor" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod.tmp
  mv go.mod.tmp go.mod
fi
# tools.go imports every command; a work directory from before kubeadm/kube-proxy is tidied again.
if ! grep -q 'cmd/kube-proxy"' tools.go 2>/dev/null; then
  { printf '//go:build tools\n\npackage k8sbuild\n\nimport (\n'
    printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "${COMMANDS[@]}"
    printf ')\n'; } > tools.go
  say "go mod tidy (downloads modules)"
  go mod tidy >/dev/null
fi

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
for b in "${BINARIES[@]}"; do
  [ -x "$OUT/$b" ] && continue
  say "go build $b (a few minutes each on 2 cores; later ones reuse the build cache)"
  start=$SECONDS
  go build -trimpath -ldflags "$ldflags" -o "$OUT/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$OUT/$b.tmp" "$OUT/$b"
  say "built $b in $((SECONDS - start))s"
done

if [ ! -x "$OUT/etcd" ]; then
  cd "$work/etcd"
  if [ ! -f go.mod ]; then
    cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    printf 'module local/etcdbuild\ngo 1.24.0\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" > go.mod
    go mod tidy >/dev/null || die "the Go module proxy did not serve go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  fi
  say "go build etcd"
  start=$SECONDS
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" .
  mv "$OUT/etcd.tmp" "$OUT/etcd"
  say "built etcd in $((SECONDS - start))s"
fi
say "done: $OUT"
echo "$OUT"
