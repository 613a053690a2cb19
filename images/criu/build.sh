#!/usr/bin/env bash
# Builds CRIU from a git repository and ref into a self-contained bundle, for the agent and placeholder
# images (both Dockerfiles run it in a build stage, so the two images carry the same CRIU).
#
#   build.sh REPO REF OUT
#     REPO  a git URL (or file:// path) of CRIU or a fork of it
#     REF   a tag, branch or commit of REPO
#     OUT   the bundle directory to create: criu, ld.so, lib/, VERSION and .complete, the layout that
#           dynamo_snapshot.agent.container.criu.CriuBundle runs (<OUT>/ld.so --library-path <OUT>/lib <OUT>/criu)
#
# The bundle carries its own dynamic loader and every library criu links, glibc included, so it runs in
# any mount namespace and on any base image: the agent runs it inside a placeholder container, and the
# placeholder's runtime image may be any distribution.
#
# INSTALL_DEPS=1 first installs the Debian build dependencies with apt-get (what the Dockerfiles do).
# CRIU_PATCHES: a directory whose *.patch files are applied (name order, patch -p1) before the build,
# default images/criu/patches next to this script (the Dockerfiles copy it and pass its path); "none"
# builds REF as it is. hack/build-criu.sh applies the same patches, so tests, bundle and images run one CRIU.
set -euo pipefail

say() { printf '[criu-bundle] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ $# -eq 3 ] || die "usage: build.sh REPO REF OUT (e.g. https://github.com/checkpoint-restore/criu.git v4.2.1 /criu)"
repo="$1" ref="$2" out="$3"
[ -n "$repo" ] || die "REPO is empty: pass the CRIU git URL (CRIU_REPO)"
[ -n "$ref" ] || die "REF is empty: pass a CRIU tag, branch or commit (CRIU_REF)"

# CRIU caches kernel probe results under RUNDIR; a private one keeps it from writing /run/criu.kdat into
# a workload container's root filesystem when it runs inside a placeholder (same as hack/build-criu.sh).
CRIU_RUNDIR="/run/dynamo-snapshot-criu"
BUILD_DEPS=(
  git ca-certificates gcc make libc6-dev pkg-config python3 patch
  protobuf-c-compiler protobuf-compiler libprotobuf-dev libprotobuf-c-dev
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libnftables-dev libaio-dev uuid-dev
)

if [ "${INSTALL_DEPS:-0}" = 1 ]; then
  say "installing build dependencies"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${BUILD_DEPS[@]}" >/dev/null
fi
for tool in git make gcc pkg-config protoc-c ldd patch; do
  command -v "$tool" >/dev/null || die "$tool is missing; run with INSTALL_DEPS=1 (Debian, as root) or install: ${BUILD_DEPS[*]}"
done

patch_dir="${CRIU_PATCHES:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/patches}"
patches=()
if [ "$patch_dir" != none ]; then
  [ -d "$patch_dir" ] || die "CRIU_PATCHES=$patch_dir is not a directory of *.patch files (or 'none' to build $ref as it is)"
  while IFS= read -r name; do patches+=("$name"); done < <(cd "$patch_dir" && LC_ALL=C ls -1 | grep '\.patch$' || true)
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/criu-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="$work/src"

say "fetching $ref from $repo"
git init -q "$src"
git -C "$src" remote add origin "$repo"
# A shallow fetch of the ref works for tags, branches and (on hosts that allow it, like GitHub) commits;
# a server that refuses a commit in a shallow fetch gets a full fetch instead.
if git -C "$src" fetch -q --depth 1 origin "$ref" 2>"$work/fetch.err"; then
  git -C "$src" checkout -q --detach FETCH_HEAD
else
  say "shallow fetch of $ref refused ($(tail -n 1 "$work/fetch.err")); fetching the whole repository"
  git -C "$src" fetch -q --tags origin '+refs/heads/*:refs/remotes/origin/*' \
    || die "cannot fetch $repo: check CRIU_REPO"
  git -C "$src" checkout -q --detach "$ref" 2>/dev/null \
    || git -C "$src" checkout -q --detach "origin/$ref" 2>/dev/null \
    || die "$repo has no tag, branch or commit '$ref': check CRIU_REF"
fi
for name in "${patches[@]}"; do
  say "applying $name"
  patch -d "$src" -p1 --batch --forward <"$patch_dir/$name" >>"$work/patch.log" 2>&1 || {
    tail -n 20 "$work/patch.log" >&2
    die "$patch_dir/$name does not apply to $repo $ref; fix the patch or build with CRIU_PATCHES=none"
  }
done
say "building criu at $(git -C "$src" rev-parse --short HEAD) with $(nproc) jobs"
# GnuTLS is only for the TLS page server, which the agent never uses; leaving it out keeps the bundle small.
if ! make -C "$src" -j"$(nproc)" NO_GNUTLS=1 RUNDIR="$CRIU_RUNDIR" criu >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log" >&2
  die "criu build failed at $repo $ref"
fi

stage="$work/bundle"
mkdir -p "$stage/lib"
install -m 0755 "$src/criu/criu" "$stage/criu"
# ldd lines are "libx.so => /path (addr)" for libraries and "/path/ld-linux... (addr)" for the loader.
ldd "$stage/criu" >"$work/ldd.txt"
if grep -q "not found" "$work/ldd.txt"; then die "criu links a library that is not installed: $(grep 'not found' "$work/ldd.txt")"; fi
awk '$2 == "=>" && $3 ~ /^\// {print $3}' "$work/ldd.txt" | while read -r lib; do cp -L "$lib" "$stage/lib/"; done
loader="$(awk '$1 ~ /^\// {print $1}' "$work/ldd.txt" | head -n 1)"
[ -n "$loader" ] || die "no dynamic loader in the ldd output of criu"
install -m 0755 "$(readlink -f "$loader")" "$stage/ld.so"

version_text="$("$stage/ld.so" --library-path "$stage/lib" "$stage/criu" --version)" \
  || die "the bundle does not run through its own loader"
version="$(printf '%s\n' "$version_text" | awk '$1 == "Version:" {print $2}')"
[ -n "$version" ] || die "cannot read the version from: $version_text"
echo "$version" >"$stage/VERSION"
# The applied patch set, as its sha256sum lines (empty for an unpatched build).
if [ ${#patches[@]} -gt 0 ]; then (cd "$patch_dir" && sha256sum -- "${patches[@]}"); fi >"$stage/PATCHES"
touch "$stage/.complete"

rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$stage" "$out"
say "criu $version ($repo $ref) -> $out"
