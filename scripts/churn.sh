#!/usr/bin/env bash
# Login/logout churn: builds in release mode, starts `switchboard serve` in
# its own process, runs connect → LOGIN → disconnect cycles against it from
# a few client threads (two sockets each at most), and checks that the
# server's RSS stays flat (within 2 MB) from the end of the warm-up to the
# end of the run. Prints JSON and a PASS/FAIL line; exits 1 on FAIL.
#
#   scripts/churn.sh                      # 1,000,000 cycles after a 400,000-cycle warm-up, both at 5,000 cycles/s (~5 min)
#   scripts/churn.sh --cycles 20000 --warmup 20000
#                                         # a quick look (~1 min: the warm-up lasts 25 s at least)
#   scripts/churn.sh --cycles 3000000     # longer
#   scripts/churn.sh --users 1000000      # a larger pool of distinct user ids
#   --rate N (0: unpaced), --threads N, --sample-every N, --workers N: see
#   `switchboard-bench churn --help`; --help: this text, before any build.
#
# Writes target/churn/churn.json (and the server's config and log there).
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" -h "* | *" --help "*) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cargo build --release --quiet -p switchboard -p switchboard-bench --bin switchboard --bin switchboard-bench
mkdir -p target/churn
exec ./target/release/switchboard-bench churn --out target/churn --json target/churn/churn.json "$@"
