#!/usr/bin/env bash
# A Docker engine for `make e2e` on a machine that has none: `hack/kind/docker-engine.sh start|stop|status`.
#
#   start   apt-get installs docker.io when dockerd is missing (needs root), then starts dockerd unless
#           `docker info` already answers, and waits for it
#   stop    stops the dockerd this script started (its pid file), nothing else
#   status  says whether an engine answers
#
# The engine is one that shares the machine: it leaves iptables alone (--iptables=false, --ip-masq=false:
# no NAT rules, no FORWARD policy change; kind's node needs none, nothing in the e2e leaves the machine),
# keeps its data on the normal disk (DOCKER_DATA_ROOT, default /var/lib/docker), and runs containers with
# hack/kind/capped-runc, which cuts a container's capabilities to the machine's bounding set (these
# machines lack CAP_SYS_RESOURCE, which `docker run --privileged` asks for).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${DOCKER_ENGINE_STATE:-/var/lib/dynamo-snapshot-docker}"
DATA_ROOT="${DOCKER_DATA_ROOT:-/var/lib/docker}"
PIDFILE="$STATE/dockerd.pid"
LOG="$STATE/dockerd.log"

say() { printf '[docker-engine] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
answers() { docker info >/dev/null 2>&1; }

start() {
  if answers; then say "a Docker engine answers already"; return 0; fi
  [ "$(id -u)" = 0 ] || die "starting dockerd needs root"
  if ! command -v dockerd >/dev/null; then
    say "apt-get install docker.io"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io >&2 \
      || die "apt-get install docker.io failed (see above; run apt-get update first?)"
  fi
  mkdir -p "$STATE"
  # Its own copy of the runtime: dockerd keeps the path, and a worktree can go away.
  install -m 0755 "$HERE/capped-runc" "$STATE/capped-runc"
  cat >"$STATE/daemon.json" <<JSON
{
  "data-root": "$DATA_ROOT",
  "exec-root": "$STATE/exec",
  "pidfile": "$PIDFILE",
  "iptables": false,
  "ip-masq": false,
  "storage-driver": "overlay2",
  "runtimes": {"capped-runc": {"path": "$STATE/capped-runc"}},
  "default-runtime": "capped-runc"
}
JSON
  say "starting dockerd (log: $LOG)"
  setsid dockerd --config-file "$STATE/daemon.json" >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do
    answers && { say "dockerd $(docker version --format '{{.Server.Version}}') answers"; return 0; }
    kill -0 $! 2>/dev/null || die "dockerd exited: $(tail -n 5 "$LOG")"
    sleep 1
  done
  die "dockerd did not answer within 60s: $(tail -n 5 "$LOG")"
}

stop() {
  [ -f "$PIDFILE" ] || { say "no dockerd started by this script"; return 0; }
  pid="$(cat "$PIDFILE")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || { say "dockerd $pid stopped"; return 0; }; sleep 1; done
  die "dockerd $pid did not stop within 30s"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then echo "a Docker engine answers"; else echo "no Docker engine"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
