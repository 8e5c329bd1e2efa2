#!/usr/bin/env bash
# Capacity report: builds in release mode, starts each server in its own
# process (Switchboard, the bare ceiling relay, the tokio baseline), runs
# every scenario with the same loaders, and writes target/capacity/report.json,
# report.md, memory.svg and latency.svg.
#
#   scripts/capacity.sh            # quick mode: 4,000 connections, ~2 minutes
#   scripts/capacity.sh --full     # 19,000 connections (this host's file limit)
#   scripts/capacity.sh --no-peers # Switchboard and the ceiling only
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p switchboard --bins
if [[ " $* " != *" --no-peers "* ]]; then
  cargo build --release --quiet -p tokio-baseline
fi
exec ./target/release/switchboard-bench capacity "$@"
