# Sourced, from the repository's root, by the measurement scripts
# (idle-memory.sh, metrics-scrape.sh, recovery-memory.sh): --help and the
# arguments checked before their release build (minutes on a cold tree),
# and the tools they run besides it.
#
# check_args "[N] [RUNS]" "$@": --help prints the calling script's header
# (exit 0); more arguments than the usage names, or one that is not a
# positive number, is exit 2; a missing ss or python3 is exit 1.
check_args() {
  local usage=$1 name max arg cmd
  shift
  name=$(basename "$0")
  case "${1:-}" in
    -h | --help)
      sed -n '2,/^set -euo/p' "scripts/$name" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
  esac
  max=$(wc -w <<<"$usage")
  if [ $# -gt "$max" ]; then
    echo "$name: too many arguments (usage: scripts/$name $usage; --help)" >&2
    exit 2
  fi
  for arg in "$@"; do
    [[ "$arg" =~ ^[1-9][0-9]*$ ]] || {
      echo "$name: $arg is not a positive number (usage: scripts/$name $usage; --help)" >&2
      exit 2
    }
  done
  for cmd in ss python3; do
    command -v "$cmd" >/dev/null || {
      echo "$name: needs $cmd (Debian: apt-get install iproute2 python3)" >&2
      exit 1
    }
  done
}
