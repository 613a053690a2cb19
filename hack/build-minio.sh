#!/usr/bin/env bash
# Builds a real MinIO server (the S3 server the object-storage tests run against) from the Go module
# proxy with this machine's Go, and caches it under ~/.cache/dynamo-snapshot/bin/minio-<version>/minio.
# Re-running with the binary cached is a no-op. Prints the binary's path on stdout; progress goes to stderr.
#
# github.com/minio/minio has no replace directives, so `go install pkg@version` builds it directly. Its
# release tags (RELEASE.<date>) are not semver, so the proxy serves them only as pseudo-versions: the pin
# below is the pseudo-version of the repository's last commit (2026-02-12, 7aac2a2c5b7c). MinIO is a test
# tool here: it runs as a separate process on loopback and no project code links against it.
set -euo pipefail

MINIO_VERSION="${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
CACHE="${DYNAMO_SNAPSHOT_CACHE:-$HOME/.cache/dynamo-snapshot}"
OUT="$CACHE/bin/minio-$MINIO_VERSION"

say() { printf '[build-minio] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ -x "$OUT/minio" ]; then say "cached: $OUT/minio"; echo "$OUT/minio"; exit 0; fi
command -v go >/dev/null || die "Go is not installed (need go >= 1.24 on PATH to build minio $MINIO_VERSION)"

say "resolving github.com/minio/minio $MINIO_VERSION from $(go env GOPROXY)"
go mod download -json "github.com/minio/minio@$MINIO_VERSION" >/dev/null \
  || die "the Go module proxy did not serve github.com/minio/minio@$MINIO_VERSION (set MINIO_VERSION to one it has)"

# MinIO's own build stamps these; without them `minio --version` says DEVELOPMENT.GOGET.
stamp="${MINIO_VERSION#v0.0.0-}"           # 20260212201848-7aac2a2c5b7c
when="${stamp%%-*}"; commit="${stamp#*-}"
iso="${when:0:4}-${when:4:2}-${when:6:2}T${when:8:2}:${when:10:2}:${when:12:2}Z"
tag="DEVELOPMENT.${when:0:4}-${when:4:2}-${when:6:2}T${when:8:2}-${when:10:2}-${when:12:2}Z"
pkg="github.com/minio/minio/cmd"
ldflags="-s -w -X $pkg.Version=$iso -X $pkg.ReleaseTag=$tag -X $pkg.CommitID=$commit -X $pkg.ShortCommitID=$commit"

# go install writes into GOBIN; build into a scratch dir and move into place only when it succeeded, so an
# interrupted build never leaves a half-written binary that the cache check would accept.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/build-minio.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
say "go install minio $MINIO_VERSION (about 5 minutes cold on 2 cores; downloads modules on the first run)"
start=$SECONDS
GOFLAGS=-mod=mod CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" "github.com/minio/minio@$MINIO_VERSION" \
  || die "go install github.com/minio/minio@$MINIO_VERSION failed (see the Go output above)"
mkdir -p "$OUT"
mv "$tmp/minio" "$OUT/minio.tmp"
mv "$OUT/minio.tmp" "$OUT/minio"
say "built minio $MINIO_VERSION in $((SECONDS - start))s: $("$OUT/minio" --version 2>/dev/null | head -1 || echo '?')"
echo "$OUT/minio"
