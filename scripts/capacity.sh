#!/usr/bin/env bash
# Capacity report: builds in release mode, starts each server in its own
# process (Switchboard, the bare ceiling relay, the tokio baseline, and for
# the WebSocket comparison nginx + nchan), runs every scenario with the same
# loaders, and writes target/capacity/report.json, report.md, memory.svg and
# latency.svg.
#
#   scripts/capacity.sh [--quick]  # quick mode (the default): 4,000 connections (2,000 over WebSocket); 11-15 min with --no-peers here, the peers add theirs
#   scripts/capacity.sh --full     # as many connections as the server accepts (at most 19,000; ~18,600 with this host's file limit), 15,000 over WebSocket
#   scripts/capacity.sh --no-peers # Switchboard and the ceiling only (no tokio, no nchan)
#   scripts/capacity.sh --no-nchan # everything but nginx + nchan
#   scripts/capacity.sh --ws-only [--ws-connections N]
#                                  # only Switchboard over WebSocket next to nginx + nchan
#   --out DIR                      # where the report goes (default target/capacity)
#   --socket-buffers BYTES         # socket.rcvbuf_bytes = sndbuf_bytes for every Switchboard server (0 = the kernel's)
#   --pollers epoll,io_uring       # data paths (server.poller) side by side (the default); one mode: the whole run on it
#   --switchboard BIN, --tokio BIN # other binaries to measure (default: the release builds)
#   --help                         # this text (before building anything)
#
# The login/logout churn figure (server RSS over 400,000 connect → LOGIN →
# disconnect cycles; 1,000,000 with --full) is in the report too;
# scripts/churn.sh runs it alone.
#
# Reliable delivery is in the report too: unicast with every message stored
# (store.durability "fsync" and "os") next to the at-most-once unicast,
# store appends/syncs per second, one device catching up on 10,000 stored
# messages, and idle memory with and without the store. Every Switchboard
# server of the run has its own store under the output directory; the
# at-most-once scenarios run with delivery.send_default = "at_most_once".
#
# The nginx + nchan column needs nginx and its nchan module (Debian/Ubuntu:
#   apt-get install -y nginx libnginx-mod-nchan
# ); without them the report lists the nchan peer as absent, with the reason.
# SWITCHBOARD_NGINX=/path/to/nginx picks another nginx binary.
# The runner starts nginx itself (its own nginx.conf in a temp dir, loopback
# only, copied to target/capacity/nginx-nchan.conf); no nginx service is used.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
# Options are checked before the release builds (minutes on a cold tree).
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -h|--help) usage; exit 0 ;;
    --quick|--full|--no-peers|--no-nchan|--ws-only) ;;
    --ws-connections|--out|--switchboard|--tokio|--socket-buffers|--pollers)
      if ((i + 1 >= ${#args[@]})); then echo "capacity.sh: ${args[i]} needs a value" >&2; exit 2; fi
      i=$((i + 1)) ;;
    --ws-connections=*|--out=*|--switchboard=*|--tokio=*|--socket-buffers=*|--pollers=*) ;;
    *) echo "capacity.sh: unknown option ${args[i]} (--help lists them)" >&2; exit 2 ;;
  esac
done

# The server, and the switchboard-bench crate: its load generator and, for
# the tokio column, its tokio-baseline binary. One cargo invocation, so the
# server library is built once for both.
if [[ " $* " != *" --no-peers "* && " $* " != *" --ws-only "* ]]; then
  cargo build --release --quiet -p switchboard -p switchboard-bench --bin switchboard --bin switchboard-bench --bin tokio-baseline
else
  cargo build --release --quiet -p switchboard -p switchboard-bench --bin switchboard --bin switchboard-bench
fi
if [[ " $* " != *" --no-peers "* && " $* " != *" --no-nchan "* ]] && ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
  echo "capacity.sh: nginx not found: the nginx + nchan column will be absent (apt-get install -y nginx libnginx-mod-nchan)" >&2
fi
exec ./target/release/switchboard-bench capacity "$@"
