#!/usr/bin/env bash
# Measures what a restart after a crash costs the disk store: writes FILES
# hot-log files of MIB MiB each (what a crash can leave: the current
# epoch's, the previous one's and one waiting to be deleted, each up to
# 64 MiB; payloads of BYTES (1,000) to 10,000 users, each SEND with a
# client id, none resolved), starts
# `switchboard serve` on that data directory, and reports how long it took
# to listen, its peak RSS (VmHWM) and its RSS 5 s later, beside a server
# started on an empty directory. The record format is src/store/hotlog.rs's.
# Usage: scripts/recovery-memory.sh [FILES] [MIB] [BYTES]; SWITCHBOARD_BIN=path runs
# that binary instead of building this checkout's (a before/after pair).
set -euo pipefail
cd "$(dirname "$0")/.."
# --help, and arguments checked, before the release build (minutes on a
# cold tree).
. scripts/lib.sh
check_args "[FILES] [MIB] [BYTES]" "$@"
FILES=${1:-3}
MIB=${2:-64}
BYTES=${3:-1000}
PORT=${PORT:-7813}
bin=${SWITCHBOARD_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet -p switchboard --bin switchboard
  bin=./target/release/switchboard
fi
data=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
mkdir -p "$data/crashed/hot" "$data/empty" target
python3 - "$data/crashed/hot" "$FILES" "$MIB" "$BYTES" <<'PY'
import os, struct, sys, time, zlib
hot, files, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
users, payload, now = 10_000, b"x" * int(sys.argv[4]), int(time.time() * 1000)
seq, msg_id = [0] * users, 0
for g in range(files):
    out, n = [], 0
    while n < size:
        u = msg_id % users
        seq[u] += 1
        msg_id += 1
        to, frm = f"user{u}".encode(), b"sender"
        # MESSAGE: kind 0, seq, msg_id, ts_ms, appended_ms, client_id
        # (u64 big-endian), then `to` and `from` (u8 length + bytes), then
        # the payload; each record behind its length and CRC-32 (u32 LE).
        body = bytes([0]) + struct.pack(">5Q", seq[u], msg_id, now, now, msg_id)
        body += bytes([len(to)]) + to + bytes([len(frm)]) + frm + payload
        out.append(struct.pack("<II", len(body), zlib.crc32(body)) + body)
        n += len(out[-1])
    with open(os.path.join(hot, f"hot-{g:016x}.log"), "wb") as f:
        f.write(b"".join(out))
print(f"hot log: {files} files of {size >> 20} MiB, {msg_id} messages of {len(payload)} bytes not resolved")
PY
for dir in empty crashed; do
  log="target/recovery-memory-$dir.log"
  start=$(date +%s%N)
  "$bin" serve --log info --listen "127.0.0.1:$PORT" --ws-listen "" --data-dir "$data/$dir" \
    >"$log" 2>&1 &
  pid=$!
  until ss -ltn "sport = :$PORT" | grep -q LISTEN; do
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  took=$((($(date +%s%N) - start) / 1000000))
  sleep 5
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  echo "$dir: listening after $took ms; peak RSS $((hwm / 1024)) MiB; RSS 5 s later $((rss / 1024)) MiB"
  kill -TERM "$pid"
  wait "$pid" || true
  pid=
done
grep -h "hot log recovered" target/recovery-memory-crashed.log | sed 's/^.*INFO //'
