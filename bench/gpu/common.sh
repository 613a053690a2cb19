# Sourced by device.sh and hf.sh from the repository root, as root: wheels, PYTHONPATH, the CRIU bundle,
# the checkpoint key, CRIU's run directory on tmpfs, the network lock ($LOCK). Sets OUT, CRIU, LOCK.
OUT=${OUT:-$PWD/bench-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DYN_SNAPSHOT_CRIU_BUNDLE=${DYN_SNAPSHOT_CRIU_BUNDLE:-$PWD/.carry/criu}
B=$DYN_SNAPSHOT_CRIU_BUNDLE
CRIU="$B/ld.so --library-path $B/lib $B/criu"
# The pipeline signs and verifies every checkpoint: one key for this batch unless one is given.
if [ -z "${DYN_SNAPSHOT_KEY_DIRECTORY:-}" ]; then
  export DYN_SNAPSHOT_KEY_DIRECTORY=/var/tmp/dynamo-snapshot-keys
  [ -n "$(ls -A "$DYN_SNAPSHOT_KEY_DIRECTORY" 2>/dev/null)" ] || python3 -c \
    'import sys; from dynamo_snapshot.agent.artifact import authn; authn.create_key(sys.argv[1], "k-bench")' \
    "$DYN_SNAPSHOT_KEY_DIRECTORY" || exit 1
fi
mkdir -p /run/dynamo-snapshot-criu  # the bundle's RUNDIR
# CRIU keeps its kernel-probe cache there only on tmpfs (as /run is on a usual node); without it
# every CRIU run probes the kernel again (about 0.8 s here).
mountpoint -q /run/dynamo-snapshot-criu || mount -t tmpfs -o size=16m tmpfs /run/dynamo-snapshot-criu

# nftables is the default network lock; where the kernel has no nf_tables, fall back to skip (the
# tree is dumped in the host's network namespace, and a restore closes established connections).
if $CRIU check --feature network_lock_nftables >"$OUT/probe.log" 2>&1; then LOCK=nftables; else LOCK=skip; fi
