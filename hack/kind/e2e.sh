#!/usr/bin/env bash
# `make e2e`: checkpoint and restore a CPU worker in a kind cluster, through the real images and charts.
#
#   1. kind (built from the Go module proxy, cached) creates a one-node cluster (hack/kind/kind-config.yaml)
#   2. the agent, operator and placeholder images are built (images/Makefile.inc) and loaded into it; the
#      placeholder wraps a stand-in runtime image whose ENTRYPOINT is a CPU counter worker
#   3. helm installs the operator chart (CRDs, checkpointing enabled) and the snapshot chart (agentMount,
#      a ReadWriteOnce PVC on kind's local-path storage) in the workload namespace
#   4. a DynamoCheckpoint of the worker (hack/kind/checkpoint.yaml) must reach Ready
#   5. a DynamoGraphDeployment with checkpointRef (hack/kind/restore.yaml) must get a pod the agent
#      restores: restore status `completed` and the worker's own "restored" report with its heap intact
#
# Needs a Docker engine (kind runs its node in it) and Go. Without a Docker engine it says so and exits 0,
# building nothing. KEEP_CLUSTER=1 keeps the cluster afterwards (it is reused by the next run);
# CRIU_REPO/CRIU_REF pick the CRIU both snapshot images build; KIND_NODE_IMAGE picks the node image.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/hack/kind"
DOCKER="${DOCKER:-docker}"
CLUSTER="${KIND_CLUSTER:-dynamo-snapshot-e2e}"
NAMESPACE="${E2E_NAMESPACE:-snapshot-e2e}"
TAG=e2e
AGENT_IMAGE="dynamo-snapshot-agent:$TAG"
OPERATOR_IMAGE="dynamo-snapshot-operator:$TAG"
RUNTIME_IMAGE="dynamo-snapshot-e2e-runtime:$TAG"
PLACEHOLDER_IMAGE="dynamo-snapshot-e2e-placeholder:$TAG"   # the image hack/kind/*.yaml run
CHECKPOINT=e2e-counter
DGD=e2e-restore
TIMEOUT_S="${E2E_TIMEOUT_S:-900}"

say() { printf '[e2e] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "no Docker engine: kind e2e needs one"
  exit 0
fi

KIND="$("$REPO/hack/kind/build-kind.sh")"
HELM="$("$REPO/hack/build-helm.sh")"
work="$(mktemp -d "${TMPDIR:-/tmp}/dynamo-snapshot-e2e.XXXXXX")"
KUBECONFIG_FILE="$work/kubeconfig"

# kubectl of the node itself: always there with kind, and of the cluster's own version.
kubectl() { "$DOCKER" exec -i "$CLUSTER-control-plane" kubectl --kubeconfig=/etc/kubernetes/admin.conf "$@"; }
helm() { "$HELM" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

diagnose() {
  say "diagnostics (cluster $CLUSTER, namespace $NAMESPACE):"
  kubectl get dynamocheckpoints,dynamographdeployments,jobs,pods,pvc -n "$NAMESPACE" -o wide >&2 || true
  kubectl describe dynamocheckpoint "$CHECKPOINT" -n "$NAMESPACE" >&2 || true
  kubectl get events -n "$NAMESPACE" --sort-by=.lastTimestamp >&2 || true
  kubectl logs -n "$NAMESPACE" -l app.kubernetes.io/component=snapshot-agent --tail=200 >&2 || true
  kubectl logs -n dynamo-system deploy/dynamo-operator --tail=200 >&2 || true
  for pod in $(kubectl get pods -n "$NAMESPACE" -l nvidia.com/snapshot-checkpoint-id -o name 2>/dev/null); do
    kubectl logs -n "$NAMESPACE" "$pod" --tail=50 >&2 || true
  done
}

finish() {
  status=$?
  [ "$status" = 0 ] || diagnose
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    say "keeping cluster $CLUSTER: export KUBECONFIG=$KUBECONFIG_FILE"
  else
    "$KIND" delete cluster --name "$CLUSTER" >&2 || true
    rm -rf "$work"
  fi
  exit "$status"
}
trap finish EXIT

# Poll until `$@` prints $want; a printed $fail ends the wait at once (no point waiting out the timeout).
wait_for() {
  local what="$1" want="$2" fail="$3"; shift 3
  local deadline=$((SECONDS + TIMEOUT_S)) got=""
  while [ $SECONDS -lt $deadline ]; do
    got="$("$@" 2>/dev/null || true)"
    [ "$got" = "$want" ] && { say "$what: $got"; return 0; }
    [ -n "$fail" ] && [ "$got" = "$fail" ] && die "$what: $got"
    sleep 5
  done
  die "$what: still '$got' after ${TIMEOUT_S}s (wanted '$want')"
}

if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "reusing kind cluster $CLUSTER"
else
  say "creating kind cluster $CLUSTER"
  "$KIND" create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 180s \
    ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} >&2
fi
"$KIND" get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"

say "building images"
# A CPU-only agent (no cuda-bindings): kind has no GPU.
make -C "$REPO" --no-print-directory -f images/Makefile.inc agent-image operator-image \
  AGENT_IMAGE="$AGENT_IMAGE" OPERATOR_IMAGE="$OPERATOR_IMAGE" AGENT_EXTRAS= >&2
"$DOCKER" build -f "$HERE/runtime.Dockerfile" -t "$RUNTIME_IMAGE" "$REPO" >&2
make -C "$REPO" --no-print-directory -f images/Makefile.inc placeholder-image \
  RUNTIME_IMAGE="$RUNTIME_IMAGE" PLACEHOLDER_IMAGE="$PLACEHOLDER_IMAGE" >&2
"$KIND" load docker-image --name "$CLUSTER" "$AGENT_IMAGE" "$OPERATOR_IMAGE" "$PLACEHOLDER_IMAGE" >&2

say "installing the operator and the snapshot charts"
helm upgrade --install dynamo "$REPO/helm/operator" -n dynamo-system --create-namespace \
  --set image.repository=dynamo-snapshot-operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set checkpoint.enabled=true --wait --timeout 5m >&2
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >&2
kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite >&2
# One node: ReadWriteOnce on kind's local-path class is enough. nftables: CRIU's network lock built into
# its bundle; the restore runs CRIU inside the placeholder, whose runtime image need not have iptables.
helm upgrade --install snapshot "$REPO/helm/snapshot" -n "$NAMESPACE" \
  --set storage.pvc.size=1Gi --set storage.pvc.accessMode=ReadWriteOnce \
  --set daemonset.image.tag="$TAG" --set daemonset.image.pullPolicy=Never \
  --set config.criu.networkLock=nftables >&2
kubectl rollout status daemonset/snapshot-agent -n "$NAMESPACE" --timeout=5m >&2

say "checkpointing the CPU worker"
kubectl apply -n "$NAMESPACE" -f - <"$HERE/checkpoint.yaml" >&2
wait_for "DynamoCheckpoint $CHECKPOINT" Ready Failed \
  kubectl get dynamocheckpoint "$CHECKPOINT" -n "$NAMESPACE" -o 'jsonpath={.status.phase}'
id="$(kubectl get dynamocheckpoint "$CHECKPOINT" -n "$NAMESPACE" -o 'jsonpath={.status.checkpointID}')"
say "checkpoint ID $id"

say "restoring it through a DynamoGraphDeployment with checkpointRef"
kubectl apply -n "$NAMESPACE" -f - <"$HERE/restore.yaml" >&2
restore_pods=(kubectl get pods -n "$NAMESPACE" -l "nvidia.com/dynamo-graph-deployment-name=$DGD,nvidia.com/snapshot-checkpoint-id=$id")
wait_for "restore of container main" completed failed \
  "${restore_pods[@]}" -o 'jsonpath={.items[0].metadata.annotations.nvidia\.com/snapshot-restore-status\.main}'
pod="$("${restore_pods[@]}" -o 'jsonpath={.items[0].metadata.name}')"
report="$(kubectl logs -n "$NAMESPACE" "$pod" | grep '"event": "restored"' | tail -n 1 || true)"
[ -n "$report" ] || die "pod $pod was marked restored but the worker never reported \"restored\""
case "$report" in
  *'"heap_ok": true'*) say "restored worker: $report" ;;
  *) die "the restored worker's heap differs from the checkpointed one: $report" ;;
esac
say "PASS: DynamoCheckpoint $CHECKPOINT Ready, pod $pod restored from $id"
