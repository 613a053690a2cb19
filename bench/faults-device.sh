#!/bin/bash
# bench/faults.py on the device machine (16 cores), from the repository root, in one device call:
#
#   bash bench/faults-device.sh        # carry .carry/faults: k8s/{etcd,kube-apiserver,kube-controller-manager}.xz
#                                      # (xz of the local build) and whl/ (the cp312 wheels of .carry/node/whl)
#
# The same scenarios as on the 2-core CI machine, with the control plane not starved of CPU. Results in
# $OUT/faults.json and $OUT/faults.log. FAULTS_ARGS are passed on (say --objects 200).
set -uo pipefail
OUT=${OUT:-$PWD/faults-out}
CARRY=${FAULTS_CARRY:-.carry/faults}
WORK=${WORK:-/var/tmp/dynamo-snapshot-faults}
K8S=$WORK/cache/bin/k8s-1.34.4
mkdir -p "$OUT" "$K8S"
for f in "$CARRY"/k8s/*.xz; do
  b=$(basename "$f" .xz); [ -x "$K8S/$b" ] || { xz -dc "$f" >"$K8S/$b.tmp" && chmod +x "$K8S/$b.tmp" && mv "$K8S/$b.tmp" "$K8S/$b"; }
done
[ -e "$WORK/whl.done" ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$WORK/site" "$CARRY"/whl/*.whl && touch "$WORK/whl.done"; }
export PYTHONPATH=$PWD:$WORK/site DYNAMO_SNAPSHOT_CACHE=$WORK/cache PYTHONUNBUFFERED=1
nproc | sed 's/^/cores: /' | tee "$OUT/faults.log"
timeout "${FAULTS_TIMEOUT:-540}" python3 bench/faults.py --json "$OUT/faults.json" ${FAULTS_ARGS:-} 2>&1 \
  | grep -v "watch failed, retrying" | tee -a "$OUT/faults.log"
