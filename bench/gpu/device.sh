#!/bin/bash
# One batch on a GPU machine, from the repository root, as root: probe, the real-GPU tests, the
# benchmark. Results and logs go to $OUT (default ./bench-gpu-out).
#
# Needs the CRIU bundle in .carry/criu (cp -a "$(hack/build-criu.sh)/bundle" .carry/criu)
# and, where the machine's Python lacks them, wheels of structlog and msgspec in .whl/.
#
#   WEIGHTS_GIB=8 BATCH_SIZES=1,2,4,8,16,32 bash bench/gpu/device.sh
#   SKIP_TESTS=1 / SKIP_BENCH=1, GPU_TESTS (pytest paths), TEST_TIMEOUT / BENCH_TIMEOUT (seconds) shape the batch.
set -uo pipefail
. "$(dirname "$0")/common.sh"
{
  echo "network lock: $LOCK"
  nvidia-smi --query-gpu=name,uuid,driver_version,persistence_mode,memory.used,memory.total --format=csv
  cat /proc/driver/nvidia/version
  uname -r; nproc; free -g; df -h / /tmp /var/tmp
  python3 -c 'import sys, torch, cuda.bindings, anyio; print(sys.version.split()[0], torch.__version__, cuda.bindings.__version__, anyio.__version__)'
  $CRIU --version
  nvidia-smi -L
  # does nvidia-smi see this machine's processes (PID namespace), and which device files does CUDA open?
  python3 - <<'PY'
import os, subprocess, torch
x = torch.ones(1, device="cuda:0")
fds = sorted({os.readlink(f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd")} & {f"/dev/nvidia{i}" for i in range(16)})
maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if "/dev/nvidia" in l})
apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"], capture_output=True, text=True).stdout
print("cuda:0 process", os.getpid(), "open", fds, "mapped", maps, "nvidia-smi apps:", apps.strip() or "none")
PY
  sync
  if echo 3 >/proc/sys/vm/drop_caches; then echo "drop_caches: ok"; else echo "drop_caches: FAILED"; fi
} >>"$OUT/probe.log" 2>&1
cat "$OUT/probe.log"

ALLOC=vmm
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU tests"
  DYN_SNAPSHOT_TEST_RECORD=$OUT DYN_SNAPSHOT_TEST_NETWORK_LOCK=$LOCK timeout "${TEST_TIMEOUT:-200}" python3 -m pytest --noconftest \
    -p tests.gpu.conftest -p no:cacheprovider -m gpu ${GPU_TESTS:-tests/gpu} -v -rs 2>&1 | tee "$OUT/pytest-gpu.log"
  if ! grep -q "test_tree_checkpoint_and_restore_keep_weights_graphs_and_socket PASSED" "$OUT/pytest-gpu.log"; then
    ALLOC=torch  # weights in a VMM range did not survive the roundtrip: benchmark with plain allocations
  fi
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== benchmark (alloc $ALLOC)"
  timeout "${BENCH_TIMEOUT:-420}" python3 bench/gpu/run.py --work /var/tmp/dynamo-snapshot-bench --out "$OUT" \
    --network-lock "$LOCK" --alloc "$ALLOC" --weights-gib "${WEIGHTS_GIB:-8}" \
    --batch-sizes "${BATCH_SIZES:-1,2,4,8,16,32}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
fi
