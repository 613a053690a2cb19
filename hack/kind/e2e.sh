#!/usr/bin/env bash
# `make e2e`: checkpoint and restore a CPU worker in a kind cluster, through the real images and charts,
# built offline (no registry is needed anywhere).
#
#   1. kind (built from the Go module proxy, cached), kubeadm and kube-proxy (hack/build-k8s.sh) and the
#      kind node image (hack/kind/node_image.py: Debian's containerd/runc, our Kubernetes build, cached
#      by recipe) are made; kind creates a one-node cluster on it (hack/kind/kind-config.yaml)
#   2. the agent, operator and placeholder images are built without Docker (hack/kind/e2e_images.py) and
#      loaded; the placeholder's command is a CPU counter worker. E2E_IMAGES=docker builds them with
#      `docker build` (images/Makefile.inc; needs a registry for the base images) instead
#   3. a hostPath PersistentVolume for the checkpoint claim (the node has no provisioner); helm installs
#      the operator chart (CRDs, checkpointing enabled) and the snapshot chart (agentMount) in the
#      workload namespace
#   4. a DynamoCheckpoint of the worker (hack/kind/checkpoint.yaml) must reach Ready
#   5. a DynamoGraphDeployment with checkpointRef (hack/kind/restore.yaml) must get a pod the agent
#      restores: restore status `completed` and the worker's own "restored" report with its heap intact
#
# Needs root, a Docker engine (kind runs its node in it; hack/kind/docker-engine.sh start makes one on a
# machine without), Go, debootstrap and the venv of `make setup`. Without a Docker engine it says so and
# exits 0, building nothing. Every step prints the time since the start. It deletes its cluster at the
# end; a failed run first writes diagnostics (objects, events, logs, `kind export logs`) to
# E2E_DIAGNOSTICS (default .local/e2e-diagnostics/<time>). KEEP_CLUSTER=1 keeps the cluster (the next run
# reuses it); CRIU_REPO/CRIU_REF pick the CRIU of the docker-built images; KIND_NODE_IMAGE a node image.
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
PV_PATH=/var/lib/dynamo-snapshot-e2e/checkpoints   # inside the node container
CHECKPOINT=e2e-counter
DGD=e2e-restore
TIMEOUT_S="${E2E_TIMEOUT_S:-900}"

say() { printf '[e2e +%ds] %s\n' "$SECONDS" "$*" >&2; }
die() { say "error: $*"; exit 1; }

if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "no Docker engine: kind e2e needs one"
  exit 0
fi

PYTHON="${E2E_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || die "$PYTHON is missing: run \`make setup\` first"
KIND="$("$REPO/hack/kind/build-kind.sh")"
HELM="$("$REPO/hack/build-helm.sh")"
work="$(mktemp -d "${TMPDIR:-/tmp}/dynamo-snapshot-e2e.XXXXXX")"
KUBECONFIG_FILE="$work/kubeconfig"
DIAGNOSTICS="${E2E_DIAGNOSTICS:-$REPO/.local/e2e-diagnostics/$(date -u +%Y%m%dT%H%M%SZ)}"

# kubectl of the node itself: always there with kind, and of the cluster's own version.
kubectl() { "$DOCKER" exec -i "$CLUSTER-control-plane" kubectl --kubeconfig=/etc/kubernetes/admin.conf "$@"; }
helm() { "$HELM" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

diagnose() {
  mkdir -p "$DIAGNOSTICS"
  say "diagnostics of cluster $CLUSTER in $DIAGNOSTICS"
  kubectl get nodes,pv -o wide >"$DIAGNOSTICS/cluster.txt" 2>&1 || true
  kubectl get pods -A -o wide >>"$DIAGNOSTICS/cluster.txt" 2>&1 || true
  kubectl get dynamocheckpoints,dynamographdeployments,jobs,pods,pvc -n "$NAMESPACE" -o wide \
    >"$DIAGNOSTICS/objects.txt" 2>&1 || true
  kubectl describe dynamocheckpoints,dynamographdeployments,pods,pvc -n "$NAMESPACE" \
    >"$DIAGNOSTICS/describe.txt" 2>&1 || true
  for ns in "$NAMESPACE" dynamo-system kube-system; do
    kubectl get events -n "$ns" --sort-by=.lastTimestamp >"$DIAGNOSTICS/events-$ns.txt" 2>&1 || true
  done
  kubectl logs -n "$NAMESPACE" -l app.kubernetes.io/component=snapshot-agent --tail=-1 \
    >"$DIAGNOSTICS/agent.log" 2>&1 || true
  kubectl logs -n dynamo-system deploy/dynamo-operator --tail=-1 >"$DIAGNOSTICS/operator.log" 2>&1 || true
  for pod in $(kubectl get pods -n "$NAMESPACE" -l nvidia.com/snapshot-checkpoint-id -o name 2>/dev/null); do
    kubectl logs -n "$NAMESPACE" "$pod" --tail=-1 >"$DIAGNOSTICS/${pod#pod/}.log" 2>&1 || true
  done
  "$KIND" export logs --name "$CLUSTER" "$DIAGNOSTICS/kind" >/dev/null 2>&1 || true
  tail -n 40 "$DIAGNOSTICS/agent.log" "$DIAGNOSTICS/operator.log" >&2 2>/dev/null || true
}

finish() {
  status=$?
  [ "$status" = 0 ] || [ -z "${cluster_up:-}" ] || diagnose
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    say "keeping cluster $CLUSTER: export KUBECONFIG=$KUBECONFIG_FILE"
  else
    "$KIND" delete cluster --name "$CLUSTER" >&2 || true
    rm -rf "$work"
  fi
  if [ "$status" = 0 ]; then say "done in ${SECONDS}s"; else say "FAILED after ${SECONDS}s"; fi
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
  if [ -z "${KIND_NODE_IMAGE:-}" ]; then
    say "building the node image (cached by recipe)"
    K8S_EXTRA_BINARIES="kubeadm kube-proxy" "$REPO/hack/build-k8s.sh" >/dev/null
    KIND_NODE_IMAGE="$(python3 "$HERE/node_image.py")"
  fi
  say "creating kind cluster $CLUSTER on $KIND_NODE_IMAGE"
  cluster_up=1   # --retain: a node that fails to come up stays for the diagnostics, then goes
  "$KIND" create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 180s --retain \
    --image "$KIND_NODE_IMAGE" >&2
fi
cluster_up=1
"$KIND" get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"

say "building images"
if [ "${E2E_IMAGES:-offline}" = docker ]; then
  # A CPU-only agent (no cuda-bindings): kind has no GPU.
  make -C "$REPO" --no-print-directory -f images/Makefile.inc agent-image operator-image \
    AGENT_IMAGE="$AGENT_IMAGE" OPERATOR_IMAGE="$OPERATOR_IMAGE" AGENT_EXTRAS= >&2
  "$DOCKER" build -f "$HERE/runtime.Dockerfile" -t "$RUNTIME_IMAGE" "$REPO" >&2
  make -C "$REPO" --no-print-directory -f images/Makefile.inc placeholder-image \
    RUNTIME_IMAGE="$RUNTIME_IMAGE" PLACEHOLDER_IMAGE="$PLACEHOLDER_IMAGE" >&2
  "$KIND" load docker-image --name "$CLUSTER" "$AGENT_IMAGE" "$OPERATOR_IMAGE" "$PLACEHOLDER_IMAGE" >&2
else
  PYTHONPATH="$REPO" "$PYTHON" "$HERE/e2e_images.py" "$work/images" --tag "$TAG" >"$work/archives"
  say "loading $(wc -l <"$work/archives") images into the node"
  while read -r archive; do "$KIND" load image-archive --name "$CLUSTER" "$archive" >&2; done <"$work/archives"
  rm -rf "$work/images"
fi

say "a hostPath PersistentVolume for the checkpoint claim"
kubectl apply -f - >&2 <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $NAMESPACE-snapshot-pvc
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: standard
  hostPath: {path: $PV_PATH, type: DirectoryOrCreate}
  claimRef: {namespace: $NAMESPACE, name: snapshot-pvc}
YAML

say "installing the operator and the snapshot charts"
helm upgrade --install dynamo "$REPO/helm/operator" -n dynamo-system --create-namespace \
  --set image.repository=dynamo-snapshot-operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set checkpoint.enabled=true --set checkpoint.cleanupImage="$PLACEHOLDER_IMAGE" --wait --timeout 5m >&2
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >&2
kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite >&2
# One node: ReadWriteOnce on kind's local-path class is enough. nftables: CRIU's network lock built into
# its bundle; the restore runs CRIU inside the placeholder, whose runtime image need not have iptables.
helm upgrade --install snapshot "$REPO/helm/snapshot" -n "$NAMESPACE" \
  --set storage.pvc.size=1Gi --set storage.pvc.accessMode=ReadWriteOnce \
  --set daemonset.image.tag="$TAG" --set daemonset.image.pullPolicy=Never \
  --set config.criu.networkLock=nftables >&2
kubectl rollout status daemonset/snapshot-agent -n "$NAMESPACE" --timeout=5m >&2
kubectl rollout status deployment/dynamo-operator -n dynamo-system --timeout=5m >&2
# The cluster-wide operator runs under its chart's admission policy: the flow below shows it lets through
# everything the operator needs.
kubectl get validatingadmissionpolicybindings -o name | grep -q . \
  || die "the operator chart installed no ValidatingAdmissionPolicyBinding (admissionPolicy.ownedObjectsOnly)"
say "operator admission policy: on ($(kubectl get validatingadmissionpolicybindings -o name | tr '\n' ' '))"

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
