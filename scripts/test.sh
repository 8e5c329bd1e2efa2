#!/usr/bin/env bash
# The whole test suite (the README's test command; .ci/run calls it).
# Installs the tools the interoperability tests drive when they are missing
# (Chromium, python3 and its `websockets` package, for tests/ws_interop.rs;
# python3's `prometheus_client`, for tests/metrics.rs; schemathesis, for
# tests/api_schema.rs;
# nginx with its stream module and openssl, the TLS front of
# tests/tls_front.rs; iproute2 and procps, the network namespace of
# tests/deploy.rs; redis-server, the Redis store and cluster tests;
# prometheus, for its promtool, the alert rules of tests/metrics.rs;
# nftables, tuning/*.nft loaded in tests/tuning.rs), then runs clippy
# (zero warnings), the format and
# `cargo doc` checks, `cargo test
# --workspace` (the server and the switchboard-bench crate; arguments are
# passed on, e.g. a test filter) and, when no arguments were given, the
# Autobahn|Testsuite WebSocket conformance run (scripts/autobahn.sh) and the
# loom models of src/sync (tests/loom-models).
# Idempotent: on a machine that has everything it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# --help: this text, before anything is installed or built (any other
# argument goes to `cargo test`).
case "${1:-}" in
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

# Free disk, told up front: a full run takes about 2 GB under target/ and a
# few hundred MB under the temporary directory (tests' stores and Redis
# files), with Chromium's packages about 350 MB more when they are
# installed (4,500 MB leaves room for a slower-growing cache and logs). Short of it, the run fails late and obscurely (the linker
# dies of SIGBUS, a store reports its write failed), so say so first.
free_mb() { df -Pm "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }
mkdir -p "${CARGO_TARGET_DIR:-target}"
for dir in "${CARGO_TARGET_DIR:-target}" "${TMPDIR:-/tmp}"; do
  free=$(free_mb "$dir")
  echo "scripts/test.sh: ${free:-?} MB free under $dir" >&2
  if [ -n "$free" ] && [ "$free" -lt 4500 ]; then
    echo "scripts/test.sh: warning: less than 4,500 MB free under $dir; the run may fail for want of disk" >&2
  fi
done

# Descriptors: the tests hold up to about 10,000 at once in one process
# (tests/rooms.rs); a server raises its own soft limit, a test that only
# opens clients does not. Raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The Python the tests run: $SWITCHBOARD_PYTHON, else the first python3 on
# the PATH (Debian's once installed below). Exported, so the tests use the
# very interpreter websockets is installed into.
PYTHON="${SWITCHBOARD_PYTHON:-$(command -v python3 || echo /usr/bin/python3)}"
export SWITCHBOARD_PYTHON="$PYTHON"

# Debian packages, one "package|check" each: the package is installed when
# its check (a shell command) fails. One `apt-get update` covers them all,
# and none runs when nothing is missing. --no-install-recommends: only what
# the tests use, not the desktop a browser recommends.
APT_PACKAGES=(
  "chromium|test -x /usr/bin/chromium"
  "python3|test -x \"\$PYTHON\""
  "python3-pip|\"\$PYTHON\" -c 'import websockets.sync.client, prometheus_client.parser, schemathesis' || \"\$PYTHON\" -m pip --version"
  "nginx|test -x /usr/sbin/nginx"
  "libnginx-mod-stream|test -f /usr/lib/nginx/modules/ngx_stream_module.so"
  "openssl|command -v openssl"
  "redis-server|command -v redis-server && command -v redis-cli"
  "iproute2|command -v ip"
  "procps|command -v sysctl"
  "nftables|command -v nft"
  "prometheus|command -v promtool"
)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo -n "$@"
  else
    echo "scripts/test.sh: need root (or sudo) to run: $*" >&2
    return 1
  fi
}

missing=()
for entry in "${APT_PACKAGES[@]}"; do
  if ! (eval "${entry#*|}") >/dev/null 2>&1; then
    missing+=("${entry%%|*}")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  # Install only: no service starts (nginx would take port 80). A
  # policy-rc.d of our own is removed again; an existing one is left alone.
  policy=/usr/sbin/policy-rc.d ours=
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    ours=1
    trap 'as_root rm -f "$policy"' EXIT
  fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$ours" ]; then
    as_root rm -f "$policy"
    trap - EXIT
  fi
fi

# Python packages from PyPI, into $PYTHON, each installed when its check
# (Python code) fails:
# - websockets 11 or later (websockets.sync.client; Debian 12's
#   python3-websockets is older), for tests/ws_interop.rs;
# - prometheus_client, whose text parser (one this project did not write)
#   reads /metrics in tests/metrics.rs;
# - schemathesis 4.x, the schema-driven fuzzer of tests/api_schema.rs (its
#   command line changed between majors: 4 is what the test speaks).
pip_need() {
  if ! "$PYTHON" -c "$1" >/dev/null 2>&1; then
    echo "scripts/test.sh: installing the Python package $2 for $PYTHON" >&2
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
      "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location "$2"
  fi
}
pip_need 'import websockets.sync.client' 'websockets>=11'
pip_need 'import prometheus_client.parser' 'prometheus_client'
pip_need 'import schemathesis, sys; sys.exit(schemathesis.__version__.split(".")[0] != "4")' 'schemathesis>=4,<5'

# No incremental compilation cache: on a clean clone (CI) it is never used
# again and took 2.6 GB of target/. Set CARGO_INCREMENTAL=1 to keep it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Lints are part of the suite: zero clippy warnings on every target of the
# workspace (the server, its tests and examples; the switchboard-bench crate
# with its benches, tests and the tokio baseline).
cargo clippy --workspace --all-targets --quiet -- -D warnings

# Formatting is checked too, where rustfmt is installed (rustup's default
# profile has it; a minimal toolchain may not).
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "test.sh: rustfmt not installed; skipping the format check" >&2
fi

# The library as an embedder builds it (no `cli` feature: no clap, no
# binary) must compile on its own too.
cargo check --quiet -p switchboard --no-default-features --lib

# The API documentation an embedder reads (`cargo doc`) builds without
# warnings: a public page that links to a private item, or a bare URL,
# renders as a dead or missing link there.
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps -p switchboard

cargo test --workspace "$@"

# The other data path (`server.poller`: epoll, or io_uring's multishot
# receives on a buffer ring): the protocol, WebSocket, interop, hardening,
# rooms, reliable-delivery, API and metrics tests once more in the mode that
# is not the default (tests/common picks it up from SWITCHBOARD_TEST_POLLER),
# and Autobahn below in both. About two minutes. Skipped when arguments
# select tests. `--workspace` so that the features are resolved as for the
# run above and its test binaries are reused: `-p switchboard` alone
# resolves some dependencies' features differently and rebuilds them all.
DEFAULT_POLLER=epoll
OTHER_POLLER=io_uring
if [ $# -eq 0 ]; then
  SWITCHBOARD_TEST_POLLER=$OTHER_POLLER cargo test --workspace --test core --test hardening --test websocket \
    --test ws_interop --test rooms --test reliable --test api --test admin --test metrics --test directory_churn
  # And the owner's writes one sendmsg each (`server.batch_sends = false`,
  # also what a host that refuses io_uring gets) in the default mode.
  SWITCHBOARD_TEST_BATCH_SENDS=0 cargo test --workspace --test core --test hardening --test rooms
fi

# WebSocket conformance: the Autobahn|Testsuite fuzzingclient (301 cases)
# against the echo mode of the debug build `cargo test` just built; fails
# on any FAILED or NON-STRICT case. It installs Python 2.7 and the suite
# into target/autobahn the first time (about 50 s), then runs in about
# 90 s. Skipped when arguments select tests, or with SWITCHBOARD_SKIP_AUTOBAHN=1.
if [ $# -eq 0 ] && [ -z "${SWITCHBOARD_SKIP_AUTOBAHN:-}" ]; then
  SWITCHBOARD_TEST_POLLER=$DEFAULT_POLLER scripts/autobahn.sh
  SWITCHBOARD_TEST_POLLER=$OTHER_POLLER scripts/autobahn.sh
fi

# The loom models (tests/loom-models/): every interleaving, within each model's
# preemption bound, of the slot lock, the request list, the mailbox wake
# and the room count limit, run on the server's own src/sync files. About
# a minute on 2 cores, plus 1.5 minutes to build loom the first time (it
# comes from crates.io through Cargo).
# Their own target directory: `--cfg loom` would otherwise rebuild the
# main build's dependencies. Skipped when arguments select tests.
if [ $# -eq 0 ]; then
  RUSTFLAGS="${RUSTFLAGS:-} --cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p loom-models --release
fi
