#!/bin/bash
# The GPU worker checkpointed and restored by the agent on a real kubelet, on a GPU machine, from the
# repository root, as root (see bench/gpu/README.md, "On a real kubelet"). Resumable: each unpack step
# leaves a marker in $WORK and is skipped once done, so the binaries can arrive over several device calls.
#
#   NODE_CARRY=.carry/node bash bench/gpu/node-e2e.sh
#
# $NODE_CARRY holds what the machine lacks (any subset, unpacked on first sight):
#   k8s/*.xz           etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet (xz)
#   runtime.tar.xz     bin/{containerd,containerd-shim-runc-v2,ctr,runc} cni/{bridge,host-local,loopback}
#   base-layer.tar.xz  + layer.tar.json: the placeholder image's cached base layer (hack/images)
#   whl/*.whl          Python packages the machine's python3 lacks (structlog, msgspec, cryptography, ...)
#   stubs.tar.xz       the generated CRI and device-plugin stubs (no grpcio-tools there)
# CRIU: $DYN_SNAPSHOT_CRIU_BUNDLE (default .carry/criu). Results: $OUT/node-e2e.json, node-e2e.log,
# node-logs.tgz (every component's log), and the same worker restored through agent.tree (the host
# process-tree front end of the same pipeline) in tree-results.json / tree.log for comparison (SKIP_TREE=1
# leaves it out). UNPACK_ONLY=1 stops after unpacking.
set -uo pipefail
OUT=${OUT:-$PWD/bench-gpu-out}
CARRY=${NODE_CARRY:-.carry/node}
WORK=${WORK:-/var/tmp/dynamo-snapshot-node}
mkdir -p "$OUT" "$WORK/bin" "$WORK/cache/bin/k8s-1.34.4"
export PYTHONUNBUFFERED=1
K8S=$WORK/cache/bin/k8s-1.34.4
for f in "$CARRY"/k8s/*.xz; do
  [ -e "$f" ] || continue
  b=$(basename "$f" .xz); [ -x "$K8S/$b" ] || { xz -dc "$f" >"$K8S/$b.tmp" && chmod +x "$K8S/$b.tmp" && mv "$K8S/$b.tmp" "$K8S/$b"; }
done
if [ -f "$CARRY/runtime.tar.xz" ] && [ ! -e "$WORK/runtime.done" ]; then
  mkdir -p "$WORK/runtime" && tar -xJf "$CARRY/runtime.tar.xz" -C "$WORK/runtime" && touch "$WORK/runtime.done"
fi
if ls "$CARRY"/whl/*.whl >/dev/null 2>&1 && [ ! -e "$WORK/whl.done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$CARRY"/whl/*.whl && touch "$WORK/whl.done"
fi
if [ -f "$CARRY/base-layer.tar.xz" ]; then
  v=$(PYTHONPATH=$PWD:$WORK/site python3 -c 'from dynamo_snapshot.devcluster.images import builder; m=builder(); print(m._recipe_version("debian-bookworm-python3", m.DEBIAN_SUITE, *m.BASE_PACKAGES, *m.BASE_TRIM))')
  d=$WORK/cache/images/$v
  [ -f "$d/layer.tar" ] || { mkdir -p "$d" && xz -dc "$CARRY/base-layer.tar.xz" >"$d/layer.tar.tmp" && mv "$d/layer.tar.tmp" "$d/layer.tar" && cp "$CARRY/layer.tar.json" "$d/"; }
fi
if [ -f "$CARRY/stubs.tar.xz" ]; then tar -xJf "$CARRY/stubs.tar.xz" -C dynamo_snapshot; fi
[ -n "${UNPACK_ONLY:-}" ] && { ls -la "$K8S" "$WORK"; exit 0; }

export PYTHONPATH=$PWD:$WORK/site
export DYNAMO_SNAPSHOT_CACHE=$WORK/cache
export PATH=$WORK/runtime/bin:$PATH
export DYN_SNAPSHOT_CNI_BIN=${DYN_SNAPSHOT_CNI_BIN:-$WORK/runtime/cni}
[ -d "$CARRY/criu" ] && : "${DYN_SNAPSHOT_CRIU_BUNDLE:=$CARRY/criu}"
export DYN_SNAPSHOT_CRIU_BUNDLE=${DYN_SNAPSHOT_CRIU_BUNDLE:-$PWD/.carry/criu}
B=$DYN_SNAPSHOT_CRIU_BUNDLE
mkdir -p /run/dynamo-snapshot-criu
mountpoint -q /run/dynamo-snapshot-criu || mount -t tmpfs -o size=16m tmpfs /run/dynamo-snapshot-criu
if "$B/ld.so" --library-path "$B/lib" "$B/criu" check --feature network_lock_nftables >/dev/null 2>&1; then LOCK=nftables; else LOCK=skip; fi
{
  echo "network lock: $LOCK"; uname -r; stat -fc %T /sys/fs/cgroup; nvidia-smi -L
  python3 -c 'import sys, torch, grpc, google.protobuf as p; print(sys.version.split()[0], torch.__version__, grpc.__version__, p.__version__)'
  python3 -c 'from dynamo_snapshot.devcluster import stack; print("stack:", stack.missing() or "ok")'
  python3 -c 'from dynamo_snapshot.devcluster.gpu_plugin import discover; print(discover())'
} 2>&1 | tee "$OUT/node-e2e.log"
timeout "${NODE_TIMEOUT:-540}" python3 bench/gpu/node_e2e.py --work "$WORK" --out "$OUT" --network-lock "$LOCK" \
  --weights-gib "${WEIGHTS_GIB:-1}" --batch-sizes "${BATCH_SIZES:-1,2,4}" ${NODE_ARGS:-} 2>&1 | tee -a "$OUT/node-e2e.log"
# node_e2e.py packs the logs itself; a run stopped by the timeout leaves that to here
[ -f "$OUT/node-logs.tgz" ] || tar -czf "$OUT/node-logs.tgz" -C "$WORK/s" cluster/logs --ignore-failed-read 2>/dev/null
cp "$WORK/s/cluster/logs/gpu-plugin.log" "$OUT/" 2>/dev/null || true
if [ -z "${SKIP_TREE:-}" ]; then
  # the same worker and weights, restored through agent.tree on this machine: the container path must not be slower
  export DYN_SNAPSHOT_KEY_DIRECTORY=${DYN_SNAPSHOT_KEY_DIRECTORY:-/var/tmp/dynamo-snapshot-keys}
  [ -n "$(ls -A "$DYN_SNAPSHOT_KEY_DIRECTORY" 2>/dev/null)" ] || python3 -c \
    'import sys; from dynamo_snapshot.agent.artifact import authn; authn.create_key(sys.argv[1], "k-bench")' \
    "$DYN_SNAPSHOT_KEY_DIRECTORY"
  timeout "${TREE_TIMEOUT:-300}" python3 bench/gpu/run.py --work /var/tmp/dynamo-snapshot-bench --out "$WORK/tree" \
    --network-lock "$LOCK" --weights-gib "${WEIGHTS_GIB:-1}" --batch-sizes "${BATCH_SIZES:-1,2,4}" \
    --no-compression-probe ${TREE_ARGS:-} >"$OUT/tree.log" 2>&1
  cp "$WORK/tree/results.json" "$OUT/tree-results.json" 2>/dev/null || true
fi
