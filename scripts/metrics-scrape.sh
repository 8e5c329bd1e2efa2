#!/usr/bin/env bash
# How long a scrape of GET /metrics takes with many connections open.
# Starts `switchboard serve` with the admin API in its own process, opens N
# idle logged-in connections from loader processes (switchboard-bench idle,
# one process per 8,000 connections, so no process passes this machine's
# 20,000 open files), then times SCRAPES scrapes one after another (a new
# HTTP connection each, as a plain Prometheus does at each interval) and
# prints the median, p90 and max, with the size of one scrape, beside the
# same figures for /healthz requests made in between. When the server
# takes fewer than N (server.max_connections, automatic from its open-file
# limit: about 18,600 under a limit of 20,000), it says so and measures at
# what it holds.
# Usage: scripts/metrics-scrape.sh [N] [SCRAPES]   (default 19000 50)
set -euo pipefail
cd "$(dirname "$0")/.."
# --help, and arguments checked, before the release build (minutes on a
# cold tree).
. scripts/lib.sh
check_args "[N] [SCRAPES]" "$@"
N=${1:-19000}
SCRAPES=${2:-50}
PORT=${PORT:-7821}
ADMIN=${ADMIN:-7822}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet -p switchboard -p switchboard-bench --bin switchboard --bin switchboard-bench
mkdir -p "$TARGET"
# A store directory and ports of its own: a server started from the
# checkout by hand (./switchboard-data, WebSocket on 7710) does not stop it.
data=$(mktemp -d)
"$TARGET/release/switchboard" serve --log warn --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN" \
  --ws-listen "" --data-dir "$data/store" >"$TARGET/metrics-scrape-server.log" 2>&1 &
server=$!
loader=
cleanup() {
  [ -n "$loader" ] && kill "$loader" 2>/dev/null || true
  kill -TERM "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
# Both ports: the admin port listens before the client port does (it is
# bound with the start-up checks, served once the workers run), so a
# loader started once the admin port listened was refused.
listening() { ss -ltn "sport = :$1" | grep -q LISTEN; }
for _ in $(seq 1 100); do
  listening "$PORT" && listening "$ADMIN" && break
  kill -0 "$server" 2>/dev/null || { cat "$TARGET/metrics-scrape-server.log" >&2; exit 1; }
  sleep 0.1
done
listening "$PORT" && listening "$ADMIN" || {
  echo "metrics-scrape.sh: the server does not listen on $PORT and $ADMIN after 10 s" >&2
  cat "$TARGET/metrics-scrape-server.log" >&2
  exit 1
}
# Held long enough for the scrapes; the script ends it once they are done.
"$TARGET/release/switchboard-bench" idle --addr "127.0.0.1:$PORT" --connections "$N" --warmup 0 \
  --hold-s 600 >"$TARGET/metrics-scrape-loader.log" 2>&1 &
loader=$!
python3 - "$ADMIN" "$N" "$SCRAPES" "$loader" "$TARGET/metrics-scrape-loader.log" <<'PY'
import http.client, json, re, statistics, sys, time

admin, n, scrapes, loader, loader_log = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]


def loader_running():
    """Whether the loader still runs (an exited one is a zombie until the
    shell reaps it)."""
    try:
        with open(f"/proc/{loader}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

def get(path):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body

deadline = time.time() + 300
while True:
    logged_in = json.loads(get("/stats")[1])["stats"]["logged_in"]
    if logged_in >= n:
        break
    # The ramp is over short of N (the server full: server.max_connections,
    # automatic from its open-file limit): measure at what it holds.
    log = open(loader_log).read()
    held = re.search(r"holding (\d+) idle connections", log)
    if held and logged_in >= int(held.group(1)):
        failed = "; ".join(line.strip() for line in log.splitlines() if "failed" in line)
        print(f"metrics-scrape.sh: {held.group(1)} of {n} connections logged in ({failed}); measuring at "
              f"{held.group(1)}", file=sys.stderr)
        break
    if not loader_running():
        sys.exit(f"the loader exited with {logged_in} of {n} connections logged in:\n" + open(loader_log).read())
    if time.time() > deadline:
        sys.exit(f"only {logged_in} of {n} connections logged in after 300 s")
    time.sleep(0.5)
time.sleep(2)  # let the ramp's last replies drain
# /metrics and, interleaved, /healthz (an empty answer over the same HTTP
# path): the difference is what the scrape itself costs, and an outlier
# both see is the machine, not the scrape.
times, health, size, fds = [], [], 0, None
for _ in range(scrapes):
    t0 = time.perf_counter()
    status, body = get("/metrics")
    times.append((time.perf_counter() - t0) * 1000)
    assert status == 200, status
    size = len(body)
    t0 = time.perf_counter()
    get("/healthz")
    health.append((time.perf_counter() - t0) * 1000)
for line in body.decode().splitlines():
    if line.startswith("process_open_fds "):
        fds = line.split()[1]
conns = json.loads(get("/stats")[1])["stats"]["connections"]

def summary(t):
    t = sorted(t)
    return (f"median {statistics.median(t):.2f} ms, p90 {t[int(len(t) * 0.9) - 1]:.2f} ms, "
            f"max {t[-1]:.2f} ms")

print(f"metrics scrape at {conns} connections ({fds} open fds in the server): {summary(times)} "
      f"over {len(times)} scrapes of {size} bytes; /healthz alongside: {summary(health)}")
PY
