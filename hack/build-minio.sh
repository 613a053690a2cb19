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

NAME=minio
. "$(dirname "${BASH_SOURCE[0]}")/go-tool.sh"
go_tool_cached
go_tool_resolve "github.com/minio/minio@$MINIO_VERSION"

# MinIO's own build stamps these; without them `minio --version` says DEVELOPMENT.GOGET.
stamp="${MINIO_VERSION#v0.0.0-}"           # 20260212201848-7aac2a2c5b7c
when="${stamp%%-*}"; commit="${stamp#*-}"
iso="${when:0:4}-${when:4:2}-${when:6:2}T${when:8:2}:${when:10:2}:${when:12:2}Z"
tag="DEVELOPMENT.${when:0:4}-${when:4:2}-${when:6:2}T${when:8:2}-${when:10:2}-${when:12:2}Z"
pkg="github.com/minio/minio/cmd"
ldflags="-s -w -X $pkg.Version=$iso -X $pkg.ReleaseTag=$tag -X $pkg.CommitID=$commit -X $pkg.ShortCommitID=$commit"

GOFLAGS=-mod=mod go_tool_install "github.com/minio/minio@$MINIO_VERSION" "$ldflags" \
  "about 5 minutes cold on 2 cores; downloads modules on the first run"
