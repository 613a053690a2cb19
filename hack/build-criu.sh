#!/usr/bin/env bash
# Builds CRIU from Debian's source pool tarball, with the project's patches (images/criu/patches/*.patch,
# applied in name order with patch -p1), and caches it under ~/.cache/dynamo-snapshot/<dir>/:
#   bin/criu          the binary
#   bundle/           criu + every shared library it needs + the dynamic loader, so the agent can run
#                     the same CRIU inside a container's mount namespace without the image shipping it
# <dir> is criu-<version>-p<key>, key = the first 12 hex digits of the sha256 of the patch set (the
# `sha256sum` lines of the patch files, in order), so a changed patch is a new build next to the old one;
# CRIU_PATCHES=none builds stock CRIU into criu-<version>. CRIU_PATCHES=<dir> takes the patches from <dir>.
# dynamo_snapshot.agent.container.criu.cache_dir() computes the same directory.
# Prints the directory on stdout; re-running with the cache in place is a no-op that prints it.
#   --print-dir   only print the directory (built or not)
#
# Why build: bookworm's CRIU 3.17 fails on 6.x kernels (vDSO bounds) and 4.1.1 cannot dump IP sockets
# on kernels >= 6.16. The build needs bookworm's build dependencies (hack/ci/containers.sh installs them).
set -euo pipefail

CRIU_VERSION="${CRIU_VERSION:-4.2.1}"
CRIU_TARBALL_URL="${CRIU_TARBALL_URL:-http://deb.debian.org/debian/pool/main/c/criu/criu_${CRIU_VERSION}.orig.tar.xz}"
CACHE="${DYNAMO_SNAPSHOT_CACHE:-$HOME/.cache/dynamo-snapshot}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRIU_PATCHES="${CRIU_PATCHES:-$REPO/images/criu/patches}"
# CRIU caches kernel probe results in RUNDIR; a private directory keeps it from writing /run/criu.kdat
# into a container's root filesystem when it runs inside a placeholder's mount namespace.
CRIU_RUNDIR="/run/dynamo-snapshot-criu"

say() { printf '[build-criu] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

patches=()
if [ "$CRIU_PATCHES" != none ]; then
  [ -d "$CRIU_PATCHES" ] || die "CRIU_PATCHES=$CRIU_PATCHES is not a directory of *.patch files (or 'none' for stock CRIU)"
  while IFS= read -r name; do patches+=("$name"); done < <(cd "$CRIU_PATCHES" && LC_ALL=C ls -1 | grep '\.patch$' || true)
fi
if [ ${#patches[@]} -gt 0 ]; then
  key="$(cd "$CRIU_PATCHES" && sha256sum -- "${patches[@]}" | sha256sum | cut -c1-12)"
  NAME="criu-$CRIU_VERSION-p$key"
else
  NAME="criu-$CRIU_VERSION"
fi
OUT="$CACHE/$NAME"
if [ "${1:-}" = --print-dir ]; then
  echo "$OUT"
  exit 0
fi

if [ -x "$OUT/bin/criu" ] && [ -x "$OUT/bundle/criu" ] && [ -f "$OUT/bundle/.complete" ]; then
  say "cached: $OUT"
  echo "$OUT"
  exit 0
fi

missing=()
for tool in curl tar xz make gcc pkg-config protoc-c protoc ldd patch sha256sum; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
for lib in libprotobuf-c libnl-3.0 libnftables libbsd; do
  pkg-config --exists "$lib" 2>/dev/null || missing+=("$lib (pkg-config)")
done
[ -e /usr/include/libnet.h ] || missing+=("libnet.h (libnet1-dev)")
[ -e /usr/include/sys/capability.h ] || missing+=("sys/capability.h (libcap-dev)")
if [ ${#missing[@]} -gt 0 ]; then
  die "missing build dependencies: ${missing[*]}; run hack/ci/containers.sh (as root) or apt-get install them"
fi

# The release tarball is shared by every patch set (build/criu-<version>/); the source tree and the
# build log live in a work directory of this patch set's own.
downloads="$CACHE/build/criu-$CRIU_VERSION"
work="$CACHE/build/$NAME"
mkdir -p "$downloads" "$work"
tarball="$downloads/criu_${CRIU_VERSION}.orig.tar.xz"
if [ ! -s "$tarball" ]; then
  say "downloading $CRIU_TARBALL_URL"
  curl -fsSL --retry 3 -o "$tarball.part.$$" "$CRIU_TARBALL_URL" || die "could not download $CRIU_TARBALL_URL"
  mv "$tarball.part.$$" "$tarball"
fi

src="$work/criu-$CRIU_VERSION"
rm -rf "$src"
tar -C "$work" -xf "$tarball"
[ -d "$src" ] || die "tarball $tarball did not contain criu-$CRIU_VERSION/"
: >"$work/patch.log"
for name in "${patches[@]}"; do
  say "applying $name"
  patch -d "$src" -p1 --batch --forward <"$CRIU_PATCHES/$name" >>"$work/patch.log" 2>&1 \
    || die "$CRIU_PATCHES/$name does not apply to CRIU $CRIU_VERSION (log: $work/patch.log); fix it or build stock with CRIU_PATCHES=none"
done

say "building criu $CRIU_VERSION with $(nproc) jobs (log: $work/build.log)"
# GnuTLS is only for the TLS page server, which the agent never uses; leaving it out keeps the bundle small.
if ! make -C "$src" -j"$(nproc)" NO_GNUTLS=1 RUNDIR="$CRIU_RUNDIR" criu >"$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log" >&2
  die "criu build failed; full log in $work/build.log"
fi

stage="$OUT.tmp.$$"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/bundle/lib" "$stage/bundle/plugins"
install -m 0755 "$src/criu/criu" "$stage/bin/criu"
install -m 0755 "$src/criu/criu" "$stage/bundle/criu"

# The bundle carries its own loader and libraries (glibc included) so it runs in any mount namespace.
loader=""
while read -r line; do
  case "$line" in
    *"=> not found"*) die "criu needs a library that is not installed: $line" ;;
    *"=>"*/*) lib="$(echo "$line" | sed -E 's/.*=> ([^ ]+) .*/\1/')"; cp -L "$lib" "$stage/bundle/lib/" ;;
    /*) loader="$(echo "$line" | awk '{print $1}')" ;;
  esac
done < <(ldd "$stage/bin/criu")
[ -n "$loader" ] || die "could not find the dynamic loader of criu in ldd output"
cp -L "$loader" "$stage/bundle/ld.so"
chmod 0755 "$stage/bundle/ld.so"
"$stage/bundle/ld.so" --library-path "$stage/bundle/lib" "$stage/bundle/criu" --version >/dev/null \
  || die "the criu bundle does not run through its own loader"
echo "$CRIU_VERSION" > "$stage/bundle/VERSION"
# The applied patch set, as its sha256sum lines (empty for stock CRIU).
if [ ${#patches[@]} -gt 0 ]; then (cd "$CRIU_PATCHES" && sha256sum -- "${patches[@]}"); fi >"$stage/bundle/PATCHES"
touch "$stage/bundle/.complete"

rm -rf "$OUT"
mv "$stage" "$OUT"
mkdir -p "$CRIU_RUNDIR" 2>/dev/null || true
say "built: $("$OUT/bin/criu" --version | head -1) -> $OUT"
echo "$OUT"
