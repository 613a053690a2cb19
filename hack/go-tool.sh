# Sourced by the scripts that build a Go tool from the Go module proxy into the cache
# (hack/build-helm.sh, hack/build-minio.sh, hack/kind/build-kind.sh). The caller sets NAME (the binary)
# and OUT (its cache directory), then:
#
#   go_tool_cached                   # prints the cached binary and exits 0 when it is there
#   go_tool_resolve MODULE@VERSION   # the proxy serves it, or a clear error
#   go_tool_install PKG@VERSION LDFLAGS [NOTE]   # builds, moves into place, prints the binary's path
#
# go install writes into GOBIN; the build goes into a scratch directory and is moved into place only when
# it succeeded, so an interrupted build never leaves a half-written binary that the cache check accepts.
# Extra build environment (GOFLAGS, say) is passed by the caller's environment.

say() { printf '[build-%s] %s\n' "$NAME" "$*" >&2; }
die() { say "error: $*"; exit 1; }

go_tool_cached() {
  if [ -x "$OUT/$NAME" ]; then say "cached: $OUT/$NAME"; echo "$OUT/$NAME"; exit 0; fi
  command -v go >/dev/null || die "Go is not installed (need go >= 1.24 on PATH to build $NAME)"
}

go_tool_resolve() {
  say "resolving $1 from $(go env GOPROXY)"
  go mod download -json "$1" >/dev/null || die "the Go module proxy did not serve $1 (set the version to one it has)"
}

go_tool_install() {
  local target="$1" ldflags="$2" note="${3:-}" start
  GO_TOOL_TMP="$(mktemp -d "${TMPDIR:-/tmp}/build-$NAME.XXXXXX")"
  trap 'rm -rf "$GO_TOOL_TMP"' EXIT
  say "go install $target${note:+ ($note)}"
  start=$SECONDS
  CGO_ENABLED=0 GOBIN="$GO_TOOL_TMP" go install -trimpath -ldflags "$ldflags" "$target" \
    || die "go install $target failed (see the Go output above)"
  mkdir -p "$OUT"
  mv "$GO_TOOL_TMP/$NAME" "$OUT/$NAME.tmp"
  mv "$OUT/$NAME.tmp" "$OUT/$NAME"
  say "built $NAME in $((SECONDS - start))s: $OUT/$NAME"
  echo "$OUT/$NAME"
}
