#!/usr/bin/env bash
# WebSocket conformance with the real Autobahn|Testsuite: its fuzzingclient
# runs case groups 1-7, 9 and 10 (framing, pings, reserved bits, opcodes,
# fragmentation, UTF-8, closing, limits and performance, auto-fragmentation;
# 12 and 13 are permessage-deflate, which the server does not negotiate)
# against a switchboard server in the test-only echo mode
# (websocket.conformance_echo) on a loopback port. Fails on any case whose
# behaviour is FAILED or NON-STRICT (or any other verdict than OK,
# INFORMATIONAL, UNIMPLEMENTED), read from the suite's JSON report, and
# prints where the HTML report is.
#
# The suite (PyPI autobahntestsuite) runs on Python 2.7 only. Debian 12 has
# none, so this installs, into a cache under target/ and nothing into the
# system:
#   - python2.7 and the libraries it needs that Debian 12 lacks (libssl1.1,
#     libffi7), as Debian 11 packages fetched with apt-get from the Debian
#     mirror this machine's apt already uses (private apt state: the
#     system's is not touched) and unpacked with dpkg-deb;
#   - pip 20.3.4 (the last for Python 2), then the suite and every package it
#     runs on at pinned versions, from PyPI. Two are C extensions built here
#     (wsaccel, for fast masking, and the suite's autobahn 0.10.9 asks for
#     it), so gcc is needed.
# Idempotent: a second run installs nothing and only runs the suite.
#
# Usage: scripts/autobahn.sh [--release]
#   --release   test the release build (default: the debug build, which
#               `cargo test --workspace` has built anyway)
# Environment: AUTOBAHN_CACHE (default target/autobahn),
#   AUTOBAHN_DEBIAN_MIRROR (default: the first Debian archive URI in this
#   machine's apt sources).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PROFILE=debug
case "${1:-}" in
  --release) PROFILE=release ;;
  "") ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: scripts/autobahn.sh [--release] (--help: what it does)" >&2; exit 2 ;;
esac

CACHE="${AUTOBAHN_CACHE:-$ROOT/target/autobahn}"
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
PREFIX="$CACHE/python2.7"   # the unpacked Debian 11 packages
SUITE_VERSION=25.10.1
# The suite's own pins (its requirements), plus what they pull in, resolved
# once and frozen here: installed with --no-deps, so nothing else comes in.
PY_PACKAGES=(
  "autobahntestsuite==$SUITE_VERSION"
  autobahn==0.10.9 txaio==2.1.0 Twisted==19.10.0 zope.interface==4.6.0
  incremental==16.10.1 constantly==15.1.0 Automat==22.10.0 hyperlink==21.0.0
  PyHamcrest==1.10.1 attrs==21.4.0 idna==2.10 typing==3.10.0.0
  pyOpenSSL==19.1.0 cryptography==3.3.2 cffi==1.15.1 pycparser==2.21
  enum34==1.1.10 ipaddress==1.0.23 service-identity==18.1.0 pyasn1==0.5.1
  pyasn1-modules==0.3.0 six==1.16.0 jinja2==2.11.3 markupsafe==1.1.1
  Werkzeug==1.0.1 klein==17.10.0 unittest2==1.1.0 argparse==1.4.0
  traceback2==1.4.0 linecache2==1.0.0 wsaccel==0.6.6 ujson==2.0.3
)
# The Debian 11 packages: the interpreter, its standard library and headers
# (for the two C extensions), and pip's wheel. python-pip-whl is pinned to
# bullseye's own release: the later security update has Python 3 syntax.
DEBS=(
  python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib
  libpython2.7 libpython2.7-dev python2.7-dev libssl1.1 libffi7
  python-pip-whl=20.3.4-4+deb11u1
)

log() { echo "autobahn.sh: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

install_python2() {
  if [ -f "$PREFIX/.installed" ]; then
    return
  fi
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    log "needs apt-get and dpkg-deb (Debian or Ubuntu) to fetch Python 2.7"; exit 1; }
  local mirror="${AUTOBAHN_DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror=$( (sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n';
               awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
                 /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null) \
             | grep -E '/debian/?$' | head -n 1 || true)
  fi
  if [ -z "$mirror" ]; then
    log "no Debian archive in this machine's apt sources; set AUTOBAHN_DEBIAN_MIRROR to one"; exit 1
  fi
  local keyring=/usr/share/keyrings/debian-archive-bullseye-stable.gpg
  [ -f "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  local apt="$CACHE/apt" arch
  arch=$(dpkg --print-architecture)
  rm -rf "$apt" "$PREFIX"
  mkdir -p "$apt"/{apt.conf.d,preferences.d,sources.list.d,lists/partial,archives/partial,cache,debs} "$PREFIX"
  : > "$apt/status"
  echo "deb [signed-by=$keyring] $mirror bullseye main" > "$apt/sources.list"
  # A private apt: its own sources, lists, cache and (empty) status; the
  # system's configuration is not read and nothing is installed.
  cat > "$apt/apt.conf" <<EOF
Dir::Etc::Main "/dev/null";
Dir::Etc::Parts "$apt/apt.conf.d";
Dir::Etc::SourceList "$apt/sources.list";
Dir::Etc::SourceParts "$apt/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$apt/preferences.d";
Dir::State "$apt";
Dir::State::Lists "$apt/lists";
Dir::State::status "$apt/status";
Dir::Cache "$apt/cache";
Dir::Cache::Archives "$apt/archives";
Debug::NoLocking "true";
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
Acquire::Languages "none";
Acquire::Retries "3";
EOF
  if [ "$(id -u)" -eq 0 ]; then
    # apt's download user cannot write here; root fetches for itself.
    echo 'APT::Sandbox::User "root";' >> "$apt/apt.conf"
  fi
  log "fetching Python 2.7 (Debian 11 packages from $mirror)"
  APT_CONFIG="$apt/apt.conf" apt-get -qq update
  (cd "$apt/debs" && APT_CONFIG="$apt/apt.conf" apt-get -qq download "${DEBS[@]}")
  for deb in "$apt"/debs/*.deb; do
    dpkg-deb -x "$deb" "$PREFIX"
  done
  # The lists and the packages (about 115 MB) are not needed again.
  rm -rf "$apt"
  touch "$PREFIX/.installed"
}

# Runs the private interpreter: it finds its library from its own location;
# the loader finds libssl1.1 and libffi7 beside it.
py2() {
  env -u PYTHONPATH -u PYTHONHOME -u PIP_FIND_LINKS -u PIP_REQUIRE_VIRTUALENV \
    LD_LIBRARY_PATH="$(echo "$PREFIX"/usr/lib/*-linux-gnu)" \
    PIP_CACHE_DIR="$CACHE/pip-cache" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 \
    PIP_NO_PYTHON_VERSION_WARNING=1 CFLAGS="-I$PREFIX/usr/include -I$PREFIX/usr/include/python2.7" \
    "$PREFIX/usr/bin/python2.7" "$@"
}

install_suite() {
  # The interpreter's own site directory (its .pth files are read, which
  # zope's namespace package needs).
  local site="$PREFIX/usr/lib/python2.7/dist-packages"
  local stamp="$site/.autobahn-$SUITE_VERSION"
  if [ -f "$stamp" ]; then
    return
  fi
  mkdir -p "$site"
  command -v gcc >/dev/null || {
    log "needs gcc to build wsaccel and the suite's C extensions (Debian: apt-get install gcc)"; exit 1; }
  log "installing pip, then autobahntestsuite $SUITE_VERSION and its pinned dependencies (PyPI)"
  # Debian's pip wheel, run from the wheel, installs the real pip 20.3.4
  # (its build backends must be files, not zip members).
  py2 "$PREFIX/usr/share/python-wheels/pip-20.3.4-py2.py3-none-any.whl/pip" install -q --upgrade \
    --target "$site" pip==20.3.4 setuptools==44.0.0 wheel==0.37.1
  py2 -m pip install -q --no-deps --upgrade --target "$site" "${PY_PACKAGES[@]}"
  py2 -c 'import autobahntestsuite.wstest, wsaccel, twisted, zope.interface' \
    || { log "the suite does not import after the install"; exit 1; }
  touch "$stamp"
}

t0=$(now)
install_python2
install_suite
install_s=$(since "$t0")
log "Python 2.7 and the suite ready in $install_s s (cache: $CACHE)"

# The server under test.
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet --bin switchboard
  SERVER="$ROOT/target/release/switchboard"
else
  # The binary `cargo test --workspace` builds for the tests that run it,
  # asked of Cargo by way of one such test (tests/cli.rs). `cargo build`
  # would resolve features without the dev-dependencies and build and link
  # a second copy of the server.
  SERVER=$(cargo test --workspace --test cli --no-run --quiet --message-format=json \
    | grep -o '"executable":"[^"]*/switchboard"' | tail -n 1 | cut -d'"' -f4)
  [ -x "$SERVER" ] || { log "cargo did not name the switchboard binary"; exit 1; }
fi

# A free loopback port (bound and released: a race only with another
# process picking the same port in the next moment).
PORT=$(py2 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RUN="$CACHE/run"
rm -rf "$RUN"
mkdir -p "$RUN"
# Limits for the suite's largest cases (9.1.6 and 9.2.6: 16 MiB messages):
# the message limit, a queue that holds one echo of it, and a partial-frame
# budget over four of them. The login deadline (which still applies in echo
# mode) is beyond the longest case.
cat > "$RUN/echo.toml" <<EOF
[server]
listen = "127.0.0.1:0"
workers = 2
${SWITCHBOARD_TEST_POLLER:+poller = \"$SWITCHBOARD_TEST_POLLER\"}

[timeouts]
login_timeout_ms = 600000
message_timeout_ms = 120000

[limits]
outbound_max_bytes = 67108864
partial_bytes_per_worker = 268435456

[websocket]
listen = "127.0.0.1:$PORT"
conformance_echo = true
max_message_bytes = 16777216

# Echo only: no inbox store (the default would open ./switchboard-data).
[store]
kind = "none"
EOF
"$SERVER" serve --config "$RUN/echo.toml" --log warn > "$RUN/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  if py2 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1).close()" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server did not start:"; cat "$RUN/server.log" >&2; exit 1
  fi
  sleep 0.1
done

cat > "$RUN/fuzzingclient.json" <<EOF
{
  "outdir": "$RUN/report",
  "servers": [{ "agent": "switchboard", "url": "ws://127.0.0.1:$PORT" }],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF
log "running the fuzzingclient against ws://127.0.0.1:$PORT ($PROFILE build)"
t1=$(now)
(cd "$RUN" && py2 -m autobahntestsuite.wstest -m fuzzingclient -s fuzzingclient.json > wstest.log 2>&1) || {
  log "the fuzzingclient failed:"; tail -n 30 "$RUN/wstest.log" >&2; exit 1; }
suite_s=$(since "$t1")

# The verdicts, from the JSON report: every case's behaviour and closing
# behaviour. OK, INFORMATIONAL and UNIMPLEMENTED pass; anything else fails.
status=0
py2 - "$RUN/report/index.json" <<'EOF' || status=$?
import json, sys
from collections import Counter
report = json.load(open(sys.argv[1]))
cases = report["switchboard"]
behavior = Counter(c["behavior"] for c in cases.values())
closing = Counter(c["behaviorClose"] for c in cases.values())
ok = ("OK", "INFORMATIONAL", "UNIMPLEMENTED")
def key(case):
    return [int(p) for p in case.split(".")]
bad = sorted((k for k, c in cases.items() if c["behavior"] not in ok or c["behaviorClose"] not in ok), key=key)
print("autobahn.sh: %d cases; behaviour: %s; closing behaviour: %s" % (
    len(cases),
    ", ".join("%s %d" % kv for kv in sorted(behavior.items())),
    ", ".join("%s %d" % kv for kv in sorted(closing.items()))))
for k in bad:
    c = cases[k]
    print("autobahn.sh: case %s: %s (closing: %s)" % (k, c["behavior"], c["behaviorClose"]))
print("autobahn: %d passed, %d failed" % (len(cases) - len(bad), len(bad)))
sys.exit(1 if bad else 0)
EOF
log "suite ran in $suite_s s (install/check $install_s s); HTML report: $RUN/report/index.html"
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  log "the server died during the run:"; tail -n 30 "$RUN/server.log" >&2; exit 1
fi
exit $status
