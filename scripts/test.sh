#!/usr/bin/env bash
# The whole test suite (the README's test command; .ci/run calls it).
# Installs the tools the interoperability tests drive (Chromium, python3 and
# its `websockets` package, for tests/ws_interop.rs) when they are missing,
# then runs clippy (zero warnings), `cargo test` (arguments are passed on,
# e.g. a test filter) and, when no arguments were given, the loom models of
# src/sync.
# Idempotent: on a machine that has everything it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, one "package|check" each: the package is installed when
# its check (a shell command) fails. One `apt-get update` covers them all,
# and none runs when nothing is missing.
APT_PACKAGES=(
  "chromium|test -x /usr/bin/chromium"
  "python3|command -v python3"
  "python3-pip|python3 -c 'import websockets.sync.client' || python3 -m pip --version"
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
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# websockets 11 or later (websockets.sync.client); Debian 12's
# python3-websockets is older, so it comes from PyPI.
if ! python3 -c 'import websockets.sync.client' >/dev/null 2>&1; then
  echo "scripts/test.sh: installing the Python package websockets" >&2
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --upgrade websockets
fi

# Lints are part of the suite: zero clippy warnings on every target of the
# workspace (the server, its tests, benches and examples, the tokio baseline).
cargo clippy --workspace --all-targets --quiet -- -D warnings

cargo test "$@"

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
