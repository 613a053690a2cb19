#!/usr/bin/env bash
# `make placeholder-image`: builds images/placeholder/Dockerfile on top of RUNTIME_IMAGE, passing in the
# runtime image's ENTRYPOINT and CMD (a Dockerfile cannot read them from its base image, and the
# placeholder's own ENTRYPOINT would drop them). Prints the built image's name on stdout.
#
#   RUNTIME_IMAGE       required: the runtime image to wrap
#   PLACEHOLDER_IMAGE   default: <IMAGE_REGISTRY><runtime name>-placeholder:<runtime tag>
#   RUNTIME_ENTRYPOINT, RUNTIME_CMD
#                       default: read with `docker image inspect` (pulling the image if needed); set them
#                       (JSON lists, or null) when the runtime image cannot be pulled where you build
#   CUDA_CHECKPOINT_URL, CUDA_CHECKPOINT_SHA256   optional cuda-checkpoint binary
#   DOCKER              default: docker
# Extra arguments go to `docker build` as they are (the Makefile passes CRIU_REPO/CRIU_REF there).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DOCKER="${DOCKER:-docker}"

say() { printf '[placeholder-image] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

runtime="${RUNTIME_IMAGE:-}"
[ -n "$runtime" ] || die "RUNTIME_IMAGE is not set: make placeholder-image RUNTIME_IMAGE=<your runtime image>, e.g. RUNTIME_IMAGE=nvcr.io/nvidia/ai-dynamo/vllm-runtime:<tag>"

placeholder="${PLACEHOLDER_IMAGE:-}"
if [ -z "$placeholder" ]; then
  # registry.example.com:5000/team/vllm-runtime:1.2@sha256:... -> vllm-runtime-placeholder:1.2
  last="${runtime%%@*}"
  last="${last##*/}"
  name="${last%%:*}"
  tag="latest"
  [ "$name" = "$last" ] || tag="${last#*:}"
  placeholder="${IMAGE_REGISTRY:-}${name}-placeholder:${tag}"
fi

entrypoint="${RUNTIME_ENTRYPOINT:-}"
cmd="${RUNTIME_CMD:-}"
base="$runtime"
if [ -z "$entrypoint" ] || [ -z "$cmd" ]; then
  if ! "$DOCKER" image inspect "$runtime" >/dev/null 2>&1; then
    say "pulling $runtime to read its ENTRYPOINT and CMD"
    "$DOCKER" pull "$runtime" >&2 || die "cannot pull $runtime: log in to its registry, or set RUNTIME_ENTRYPOINT and RUNTIME_CMD (JSON, or null)"
  fi
  [ -n "$entrypoint" ] || entrypoint="$("$DOCKER" image inspect -f '{{json .Config.Entrypoint}}' "$runtime")"
  [ -n "$cmd" ] || cmd="$("$DOCKER" image inspect -f '{{json .Config.Cmd}}' "$runtime")"
  # Build on exactly the image that was inspected: a tag can move between the inspect and the build.
  digest="$("$DOCKER" image inspect -f '{{if .RepoDigests}}{{index .RepoDigests 0}}{{end}}' "$runtime")"
  [ -z "$digest" ] || base="$digest"
fi

say "wrapping $runtime (ENTRYPOINT $entrypoint, CMD $cmd) as $placeholder"
"$DOCKER" build -f "$HERE/Dockerfile" \
  --build-arg RUNTIME_IMAGE="$base" \
  --build-arg RUNTIME_ENTRYPOINT="$entrypoint" \
  --build-arg RUNTIME_CMD="$cmd" \
  ${CUDA_CHECKPOINT_URL:+--build-arg CUDA_CHECKPOINT_URL="$CUDA_CHECKPOINT_URL"} \
  ${CUDA_CHECKPOINT_SHA256:+--build-arg CUDA_CHECKPOINT_SHA256="$CUDA_CHECKPOINT_SHA256"} \
  "$@" -t "$placeholder" "$REPO" >&2
echo "$placeholder"
