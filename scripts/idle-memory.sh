#!/usr/bin/env bash
# Measures server user-space memory per idle, logged-in connection:
# starts `switchboard serve` in its own process on a private port, ramps N
# connections from loader processes (switchboard-bench idle), and reports
# the server's RSS delta divided by N. Usage: scripts/idle-memory.sh [N] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
# --help, and arguments checked, before the release build (minutes on a
# cold tree).
. scripts/lib.sh
check_args "[N] [RUNS]" "$@"
N=${1:-16000}
RUNS=${2:-1}
PORT=${PORT:-7811}
cargo build --release --quiet -p switchboard -p switchboard-bench --bin switchboard --bin switchboard-bench
# A store directory and ports of its own: a server started from the
# checkout by hand (./switchboard-data, WebSocket on 7710) does not stop it.
data=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
for run in $(seq 1 "$RUNS"); do
  rm -rf "$data/run"
  ./target/release/switchboard serve --log warn --listen "127.0.0.1:$PORT" --ws-listen "" --data-dir "$data/run" \
    >"target/idle-memory-server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    ss -ltn "sport = :$PORT" | grep -q LISTEN && break
    kill -0 "$pid" 2>/dev/null || { cat target/idle-memory-server.log >&2; exit 1; }
    sleep 0.1
  done
  ss -ltn "sport = :$PORT" | grep -q LISTEN || {
    echo "idle-memory.sh: the server does not listen on $PORT after 10 s" >&2
    cat target/idle-memory-server.log >&2
    exit 1
  }
  ./target/release/switchboard-bench idle --addr "127.0.0.1:$PORT" --connections "$N" --server-pid "$pid" \
    --json "target/idle-memory-$run.json" >/dev/null
  kill -TERM "$pid"
  wait "$pid" || true
  pid=
  python3 - "target/idle-memory-$run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"run: {r['connections']} idle logged-in connections: {r['server_user_bytes_per_conn_cold']:.0f} bytes/connection "
      f"(server RSS delta from a fresh start / N); {r['server_user_bytes_per_conn']:.0f} after a "
      f"{r['warmup_connections']}-connection warm-up; connect+login {r['connect_rate_per_s']:.0f}/s")
PY
done
