#!/bin/bash
# The unmodified transformers worker (hf_worker.py, a random Llama-3-8B-shaped model) through the
# project's pipeline, from the repository root, as root, in one device call (see bench/gpu/README.md):
#
#   LAYERS=32 bash bench/gpu/hf.sh          # carry .carry/criu and .whl
#
# Results in $OUT: hf-results.json, hf.log (with the table), hf-logs.tgz. HF_TIMEOUT (s) bounds the run.
set -uo pipefail
. "$(dirname "$0")/common.sh"
timeout "${HF_TIMEOUT:-540}" python3 bench/gpu/hf_run.py --work /var/tmp/dynamo-snapshot-bench --out "$OUT" \
  --network-lock "$LOCK" --layers "${LAYERS:-32}" --budget "$(( ${HF_TIMEOUT:-540} - 10 ))" ${HF_ARGS:-} 2>&1 \
  | tee "$OUT/hf.log"
