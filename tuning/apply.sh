#!/usr/bin/env bash
# Kernel and limits tuning for a Switchboard server (or a load-generator
# host) that is to hold N connections: computes every value from N and this
# host's RAM, shows current vs new, and (without --dry-run) applies the
# changes and writes them as drop-ins so they survive a reboot.
#
#   tuning/apply.sh --connections 1000000 --dry-run     # look first
#   sudo tuning/apply.sh --connections 1000000          # then apply
#
# Why each key and what it costs: tuning/switchboard-sysctl.conf and
# tuning/loadgen-sysctl.conf. Run `tuning/apply.sh --help` for every option.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tuning/apply.sh --connections N [options]

Computes kernel and limits settings for N connections on this host's RAM,
prints a table (key | current | wanted | new | action) and, unless
--dry-run, applies the changes (sysctl -w) and writes drop-ins.

Options:
  --connections N       connections to plan for (required)
  --dry-run             change nothing: show the table and what would be written
  --role server|loadgen server (default) or load-generator profile
  --ram-bytes BYTES     plan for this much RAM instead of /proc/meminfo MemTotal
  --sysctl-dir DIR      where the sysctl drop-in goes (default /etc/sysctl.d)
  --limits-dir DIR      where the limits drop-in goes (default /etc/security/limits.d)
  --user NAME           user of the limits drop-in (default: switchboard; loadgen: '*' and root)
  --only KEY[,KEY...]   handle only these keys ("nofile" = the limits drop-in); the
                        sysctl drop-in keeps what an earlier run wrote for the others
  --proc-sys DIR        read (and write) current values under DIR instead of /proc/sys (tests)
  --force               go on although the under-load estimate exceeds RAM
  --switchboard BIN     the switchboard binary whose `switchboard check` states the
                        measured memory per idle connection (default: $SWITCHBOARD_BIN,
                        else switchboard on the PATH, else target/release/switchboard
                        of this checkout)
  --user-bytes B --kernel-bytes B
                        give those two figures instead of asking a binary (a host
                        without one: take them from `switchboard check` elsewhere,
                        or docs/DEPLOY.md)
  -h, --help            this text

Values are only ever raised: a current value already higher than the wanted
one is kept (for tcp_fin_timeout and the keepalive timers, already lower is
kept; ip_local_port_range is only widened). The exceptions are the min and
default of tcp_rmem/tcp_wmem, set to 4096: every connection starts with small
buffers, and the kernel grows those of a busy one up to the max. Exit
status: 0 done, 1 refused or failed (the reason is printed), 2 bad usage.
EOF
}

die_usage() {
  echo "apply.sh: $*" >&2
  echo "Run 'tuning/apply.sh --help' for usage." >&2
  exit 2
}

# ---------------------------------------------------------------------------
# Figures; every estimate below is per connection. The memory of an idle
# connection (ours and the kernel's) is measured and lives in one place,
# src/limits.rs: it comes from `switchboard check` (see read_figures below).
BUF_BYTES=4096     # per direction under load: tcp_rmem/tcp_wmem's default (set below), or socket.*buf_bytes
FILE_MARGIN=65536  # fs.file-max / fs.nr_open headroom over N x 1.1
NOFILE_MARGIN=4096 # RLIMIT_NOFILE headroom over N (listeners, rings, eventfds, admin API)
ROUND=65536        # descriptor counts are rounded up to a multiple of this
MAX_CONNECTIONS=1000000000

# ---------------------------------------------------------------------------
# Arguments.
CONNECTIONS=""
DRY_RUN=0
ROLE=server
RAM_BYTES=""
SYSCTL_DIR=/etc/sysctl.d
LIMITS_DIR=/etc/security/limits.d
PROC_SYS=/proc/sys
LIMITS_USERS=""
ONLY=""
FORCE=0
SWITCHBOARD=""
USER_BYTES=""
KERNEL_BYTES=""

args=()
for a in "$@"; do
  case "$a" in
    --*=*) args+=("${a%%=*}" "${a#*=}") ;;
    *) args+=("$a") ;;
  esac
done
set -- ${args[@]+"${args[@]}"}
while (($#)); do
  opt=$1
  case "$opt" in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --force) FORCE=1 ;;
    --connections | --role | --ram-bytes | --sysctl-dir | --limits-dir | --user | --only | --proc-sys | \
      --switchboard | --user-bytes | --kernel-bytes)
      (($# >= 2)) || die_usage "$opt needs a value"
      val=$2
      shift
      case "$opt" in
        --connections) CONNECTIONS=$val ;;
        --role) ROLE=$val ;;
        --ram-bytes) RAM_BYTES=$val ;;
        --sysctl-dir) SYSCTL_DIR=$val ;;
        --limits-dir) LIMITS_DIR=$val ;;
        --user) LIMITS_USERS="${LIMITS_USERS:+$LIMITS_USERS }$val" ;;
        --only) ONLY="${ONLY:+$ONLY,}$val" ;;
        --proc-sys) PROC_SYS=${val%/} ;;
        --switchboard) SWITCHBOARD=$val ;;
        --user-bytes) USER_BYTES=$val ;;
        --kernel-bytes) KERNEL_BYTES=$val ;;
      esac
      ;;
    *) die_usage "unknown argument: $opt" ;;
  esac
  shift
done

is_uint() { [[ $1 =~ ^[0-9]{1,18}$ ]]; }

[[ -n $CONNECTIONS ]] || die_usage "--connections N is required"
is_uint "$CONNECTIONS" || die_usage "--connections must be a whole number, got '$CONNECTIONS'"
N=$((10#$CONNECTIONS))
((N >= 1)) || die_usage "--connections must be at least 1"
((N <= MAX_CONNECTIONS)) || die_usage "--connections $N is more than this script plans for ($MAX_CONNECTIONS)"
case "$ROLE" in
  server | loadgen) ;;
  *) die_usage "--role must be server or loadgen, got '$ROLE'" ;;
esac

if [[ -n $RAM_BYTES ]]; then
  is_uint "$RAM_BYTES" || die_usage "--ram-bytes must be a whole number of bytes, got '$RAM_BYTES'"
  RAM=$((10#$RAM_BYTES))
  RAM_SOURCE="--ram-bytes"
else
  kb=""
  if [[ -r /proc/meminfo ]]; then
    while read -r name value _; do
      if [[ $name == MemTotal: ]]; then
        kb=$value
        break
      fi
    done </proc/meminfo
  fi
  is_uint "$kb" || die_usage "cannot read MemTotal from /proc/meminfo: pass --ram-bytes"
  RAM=$((10#$kb * 1024))
  RAM_SOURCE="MemTotal"
fi
((RAM >= 1 << 26)) || die_usage "RAM of $RAM bytes is below 64 MiB: pass --ram-bytes in bytes"
((RAM <= 1 << 50)) || die_usage "RAM of $RAM bytes is above 1 PiB: pass --ram-bytes in bytes"

if [[ -n $USER_BYTES || -n $KERNEL_BYTES ]]; then
  [[ -n $USER_BYTES && -n $KERNEL_BYTES ]] || die_usage "--user-bytes and --kernel-bytes go together"
  is_uint "$USER_BYTES" || die_usage "--user-bytes must be a whole number of bytes, got '$USER_BYTES'"
  is_uint "$KERNEL_BYTES" || die_usage "--kernel-bytes must be a whole number of bytes, got '$KERNEL_BYTES'"
  [[ -z $SWITCHBOARD ]] || die_usage "--switchboard and --user-bytes/--kernel-bytes exclude each other"
  USER_BYTES=$((10#$USER_BYTES)) KERNEL_BYTES=$((10#$KERNEL_BYTES))
  FIGURES_SOURCE="--user-bytes/--kernel-bytes"
else
  # The measured memory per idle connection, from the binary that is to run:
  # `switchboard check` prints "per idle connection: user_bytes=U kernel_bytes=K".
  fail_figures() {
    echo "apply.sh: $*" >&2
    echo "apply.sh: the memory per idle connection comes from 'switchboard check' (src/limits.rs). Build the binary (cargo build --release), pass --switchboard BIN or set SWITCHBOARD_BIN, or give the figures with --user-bytes B --kernel-bytes B (docs/DEPLOY.md, \"Memory per connection\")." >&2
    exit 1
  }
  if [[ -z $SWITCHBOARD ]]; then
    if [[ -n ${SWITCHBOARD_BIN:-} ]]; then
      SWITCHBOARD=$SWITCHBOARD_BIN
    elif command -v switchboard >/dev/null 2>&1; then
      SWITCHBOARD=$(command -v switchboard)
    elif [[ -x "$(dirname "$0")/../target/release/switchboard" ]]; then
      SWITCHBOARD="$(dirname "$0")/../target/release/switchboard"
    else
      fail_figures "no switchboard binary found (not in \$SWITCHBOARD_BIN, not on the PATH, not at $(dirname "$0")/../target/release/switchboard)"
    fi
  fi
  [[ -x $SWITCHBOARD && ! -d $SWITCHBOARD ]] || fail_figures "$SWITCHBOARD is not an executable file"
  # check exits 1 when this host falls short of N: that is what apply.sh is
  # about to fix, so only the line matters.
  check_out=$("$SWITCHBOARD" check --connections "$N" 2>&1) || true
  figures=$(sed -n 's/^per idle connection: user_bytes=\([0-9]\{1,12\}\) kernel_bytes=\([0-9]\{1,12\}\)\( .*\)\{0,1\}$/\1 \2/p' <<<"$check_out")
  read -r USER_BYTES KERNEL_BYTES <<<"$figures" || true
  if ! is_uint "${USER_BYTES:-}" || ! is_uint "${KERNEL_BYTES:-}"; then
    fail_figures "'$SWITCHBOARD check --connections $N' printed no 'per idle connection: user_bytes=… kernel_bytes=…' line (a build older than this script?); it said: $(head -c 300 <<<"$check_out")"
  fi
  USER_BYTES=$((10#$USER_BYTES)) KERNEL_BYTES=$((10#$KERNEL_BYTES))
  FIGURES_SOURCE="$SWITCHBOARD check"
fi

PAGE_SIZE=$(getconf PAGESIZE 2>/dev/null || echo 4096)
is_uint "$PAGE_SIZE" && ((PAGE_SIZE > 0)) || PAGE_SIZE=4096

# ---------------------------------------------------------------------------
# Helpers.
human() { # bytes -> "x.xx GiB" / "x.x MiB"
  local b=$1 h
  if ((b >= 1 << 30)); then
    h=$(((b * 100 + (1 << 29)) >> 30))
    printf '%d.%02d GiB' $((h / 100)) $((h % 100))
  else
    h=$(((b * 10 + (1 << 19)) >> 20))
    printf '%d.%d MiB' $((h / 10)) $((h % 10))
  fi
}
round_up() { echo $((($1 + $2 - 1) / $2 * $2)); }
pow2_at_least() {
  local p=1
  while ((p < $1)); do p=$((p * 2)); done
  echo "$p"
}
min() { echo $(($1 < $2 ? $1 : $2)); }
max() { echo $(($1 > $2 ? $1 : $2)); }
normalize() { # squeeze tabs/spaces: "4096\t131072\t6291456" -> "4096 131072 6291456"
  local -a w
  read -r -a w <<<"$1" || true
  echo "${w[*]}"
}
key_path() { echo "$PROC_SYS/${1//.//}"; }
read_current() { # key -> value or "n/a"
  local p v
  p=$(key_path "$1")
  if [[ -f $p && -r $p ]] && v=$(<"$p") 2>/dev/null; then
    normalize "$v"
  else
    echo "n/a"
  fi
}
all_uint() { # every word a whole number
  local w
  for w in $1; do is_uint "$w" || return 1; done
  [[ -n $1 ]]
}

# ---------------------------------------------------------------------------
# The plan.
FILES=$(round_up $(((N * 11 + 9) / 10 + FILE_MARGIN)) $ROUND)  # fs.file-max, fs.nr_open, nf_conntrack_max
NOFILE=$(round_up $((N + NOFILE_MARGIN)) $ROUND)                 # RLIMIT_NOFILE soft = hard
BACKLOG=$(pow2_at_least $(((N + 99) / 100)))                     # 1% of N, a power of two,
BACKLOG=$(min "$(max "$BACKLOG" 4096)" 65536)                    # within 4096..65536
PAGES=$((RAM / PAGE_SIZE))
TCP_MEM_HIGH=$(((N * 4 * BUF_BYTES + PAGE_SIZE - 1) / PAGE_SIZE)) # every buffer full, at the kernel's 2x accounting
TCP_MEM_HIGH=$(max "$TCP_MEM_HIGH" $((PAGES / 16)))              # not below 1/16 of RAM (the kernel's default is ~9%)
TCP_MEM_HIGH=$(min "$TCP_MEM_HIGH" $((PAGES / 2)))               # not above half of RAM
TCP_MEM="$((TCP_MEM_HIGH / 2)) $((TCP_MEM_HIGH * 3 / 4)) $TCP_MEM_HIGH"

if [[ $ROLE == server ]]; then
  PER_USER=$USER_BYTES
  SYSCTL_FILE=90-switchboard.conf
  LIMITS_FILE=switchboard.conf
  LIMITS_USERS=${LIMITS_USERS:-switchboard}
else
  PER_USER=0
  SYSCTL_FILE=90-switchboard-loadgen.conf
  LIMITS_FILE=switchboard-loadgen.conf
  LIMITS_USERS=${LIMITS_USERS:-* root}
fi
read -r -a LIMITS_USER_LIST <<<"$LIMITS_USERS"
SYSCTL_PATH="$SYSCTL_DIR/$SYSCTL_FILE"
LIMITS_PATH="$LIMITS_DIR/$LIMITS_FILE"

# Rows: key, policy, optional (skip when absent), wanted value, why.
#   raise: max(current, wanted)       cap: min(current, wanted)
#   each: element-wise max            buf: min and default set, max raised
#   widen: low lowered, high raised   set: wanted
R_KEY=() R_POLICY=() R_OPTIONAL=() R_WANT=() R_WHY=()
row() {
  R_KEY+=("$1")
  R_POLICY+=("$2")
  R_OPTIONAL+=("$3")
  R_WANT+=("$4")
  R_WHY+=("$5")
}
row fs.file-max raise 0 "$FILES" "open files, system-wide: N x 1.1 + $FILE_MARGIN, rounded up to a multiple of $ROUND"
row fs.nr_open raise 0 "$FILES" "largest RLIMIT_NOFILE a process may get (LimitNOFILE= cannot exceed it)"
if [[ $ROLE == server ]]; then
  row net.core.somaxconn raise 0 "$BACKLOG" "accept queue per listener: 1% of N as a power of two, 4096..65536"
  row net.ipv4.tcp_max_syn_backlog raise 0 "$BACKLOG" "half-open connections per listener (a reconnect storm)"
  row net.core.netdev_max_backlog raise 0 "$BACKLOG" "packets queued per CPU before the stack takes them"
  row net.ipv4.tcp_rmem buf 0 "4096 4096 6291456" "receive buffer min/default/max: 4 KiB per socket, grown up to the max when busy"
  row net.ipv4.tcp_wmem buf 0 "4096 4096 4194304" "send buffer min/default/max: 4 KiB per socket, grown up to the max when busy"
  row net.ipv4.tcp_mem each 0 "$TCP_MEM" "pages for all TCP buffers (low/pressure/high): high = N x 16 KiB, 1/16..1/2 of RAM"
  row net.ipv4.tcp_keepalive_time cap 0 600 "backstop to the 240 s app heartbeat, for SO_KEEPALIVE sockets"
  row net.ipv4.tcp_keepalive_intvl cap 0 60 "seconds between keepalive probes"
  row net.ipv4.tcp_keepalive_probes cap 0 5 "unanswered probes before the kernel drops the socket"
  row net.ipv4.tcp_migrate_req set 1 1 "a draining process's accept queue moves to the new one (kernel >= 5.14)"
  row net.netfilter.nf_conntrack_max raise 1 "$FILES" "tracked connections, if conntrack is loaded (or use tuning/notrack.nft)"
else
  row net.ipv4.ip_local_port_range widen 0 "1024 65535" "ephemeral ports per (source address, destination) pair"
  row net.ipv4.tcp_tw_reuse set 0 1 "reuse TIME_WAIT ports for new outgoing connections"
  row net.ipv4.tcp_fin_timeout cap 0 15 "seconds in FIN_WAIT_2 after closing (frees ports and sockets sooner)"
  row net.ipv4.tcp_mem each 0 "$TCP_MEM" "pages for all TCP buffers (low/pressure/high): high = N x 16 KiB, 1/16..1/2 of RAM"
  row net.netfilter.nf_conntrack_max raise 1 "$FILES" "tracked connections, if conntrack is loaded (or use tuning/notrack.nft)"
fi
row nofile raise 0 "$NOFILE" "RLIMIT_NOFILE soft and hard in $LIMITS_PATH: N + $NOFILE_MARGIN, rounded up"

# Every row of the profile, before --only narrows the plan: the drop-in keeps
# what an earlier run wrote for the keys --only leaves out.
ALL_KEY=("${R_KEY[@]}") ALL_OPTIONAL=("${R_OPTIONAL[@]}") ALL_WHY=("${R_WHY[@]}")

# --only: keep the named rows.
if [[ -n $ONLY ]]; then
  IFS=',' read -r -a only_keys <<<"$ONLY"
  for k in "${only_keys[@]}"; do
    found=0
    for key in "${R_KEY[@]}"; do [[ $key == "$k" ]] && found=1; done
    ((found)) || die_usage "--only: '$k' is not a key of the $ROLE profile (keys: ${R_KEY[*]})"
  done
  keep() {
    local k
    for k in "${only_keys[@]}"; do [[ $k == "$1" ]] && return 0; done
    return 1
  }
  K=() P=() O=() W=() Y=()
  for i in "${!R_KEY[@]}"; do
    if keep "${R_KEY[$i]}"; then
      K+=("${R_KEY[$i]}") P+=("${R_POLICY[$i]}") O+=("${R_OPTIONAL[$i]}") W+=("${R_WANT[$i]}") Y+=("${R_WHY[$i]}")
    fi
  done
  R_KEY=("${K[@]}") R_POLICY=("${P[@]}") R_OPTIONAL=("${O[@]}") R_WANT=("${W[@]}") R_WHY=("${Y[@]}")
fi

# Current values, new values, actions.
current_nofile() { # the hard nofile of the first user in our own drop-in, if any
  local f=$LIMITS_PATH u t item v
  if [[ -r $f ]]; then
    while read -r u t item v _; do
      if [[ $u == "${LIMITS_USER_LIST[0]}" && $t == hard && $item == nofile ]] && is_uint "$v"; then
        echo "$((10#$v))"
        return
      fi
    done <"$f"
  fi
  echo "n/a"
}
combine() { # policy current wanted -> new
  local policy=$1 cur=$2 want=$3
  local -a c w
  if [[ $cur == n/a ]] || ! all_uint "$cur"; then
    echo "$want"
    return
  fi
  read -r -a c <<<"$cur"
  read -r -a w <<<"$want"
  if ((${#c[@]} != ${#w[@]})); then
    echo "$want"
    return
  fi
  case "$policy" in
    raise) max "${c[0]}" "${w[0]}" ;;
    cap) min "${c[0]}" "${w[0]}" ;;
    set) echo "$want" ;;
    each) echo "$(max "${c[0]}" "${w[0]}") $(max "${c[1]}" "${w[1]}") $(max "${c[2]}" "${w[2]}")" ;;
    buf) echo "${w[0]} ${w[1]} $(max "${c[2]}" "${w[2]}")" ;;
    widen) echo "$(min "${c[0]}" "${w[0]}") $(max "${c[1]}" "${w[1]}")" ;;
  esac
}
R_CUR=() R_NEW=() R_ACTION=()
for i in "${!R_KEY[@]}"; do
  if [[ ${R_KEY[$i]} == nofile ]]; then
    cur=$(current_nofile)
  else
    cur=$(read_current "${R_KEY[$i]}")
  fi
  new=$(combine "${R_POLICY[$i]}" "$cur" "${R_WANT[$i]}")
  if [[ $cur == n/a && ${R_OPTIONAL[$i]} == 1 ]]; then
    action=skip
  elif [[ $cur == "$new" ]]; then
    action=ok
  else
    action=change
  fi
  R_CUR+=("$cur")
  R_NEW+=("$new")
  R_ACTION+=("$action")
done
new_of() { # key -> new value (empty if not planned)
  local i
  for i in "${!R_KEY[@]}"; do
    if [[ ${R_KEY[$i]} == "$1" ]]; then
      echo "${R_NEW[$i]}"
      return
    fi
  done
}

# ---------------------------------------------------------------------------
# Memory estimate: refuse what cannot fit.
PER_IDLE=$((PER_USER + KERNEL_BYTES))
PER_BUSY=$((PER_IDLE + 2 * BUF_BYTES))
IDLE=$((N * PER_IDLE))
BUSY=$((N * PER_BUSY))
PCT=$(((BUSY * 2000 / RAM + 1) / 2)) # tenths of a percent, rounded
if [[ $ROLE == server ]]; then
  idle_what="$USER_BYTES B user + $KERNEL_BYTES B kernel each"
else
  idle_what="$KERNEL_BYTES B kernel each; the load generator's own memory not counted"
fi
echo "switchboard tuning: role $ROLE, $N connections, RAM $RAM B ($(human $RAM), from $RAM_SOURCE), page size $PAGE_SIZE B$( ((DRY_RUN)) && echo ", dry run")"
echo "memory per idle connection: $USER_BYTES B user + $KERNEL_BYTES B kernel (from $FIGURES_SOURCE)"
echo "memory estimate: $N connections: idle $IDLE B ($(human $IDLE): $idle_what); under load up to $BUSY B ($(human $BUSY): + 2 x $BUF_BYTES B socket buffers each); RAM $RAM B ($(human $RAM)): $((PCT / 10)).$((PCT % 10))% under load"
if ((IDLE > RAM || (BUSY > RAM && !FORCE))); then
  fit=$((RAM / PER_BUSY))
  what="under load"
  need=$BUSY
  if ((IDLE > RAM)); then
    fit=$((RAM / PER_IDLE))
    what="even idle"
    need=$IDLE
  fi
  echo "apply.sh: refused: $N connections need up to $need B ($(human $need)) $what, more than this host's RAM of $RAM B ($(human $RAM)); at most $fit connections fit. Lower --connections or add memory$( ((IDLE <= RAM)) && echo " (or pass --force if they stay mostly idle)")." >&2
  exit 1
fi
if ((BUSY > RAM)); then
  echo "warning: --force: under load the estimate exceeds RAM; the kernel caps socket buffers at net.ipv4.tcp_mem's high mark, past which writes stall and packets drop"
elif ((BUSY * 10 > RAM * 8)); then
  echo "warning: under load this leaves less than 20% of RAM for the kernel's other needs, the page cache and other processes"
fi

# ---------------------------------------------------------------------------
# The table.
echo
printf '%-32s | %-24s | %-24s | %-24s | %s\n' key current wanted new action
printf '%s\n' "---------------------------------+--------------------------+--------------------------+--------------------------+-------"
for i in "${!R_KEY[@]}"; do
  printf '%-32s | %-24s | %-24s | %-24s | %s\n' "${R_KEY[$i]}" "${R_CUR[$i]}" "${R_WANT[$i]}" "${R_NEW[$i]}" "${R_ACTION[$i]}"
done
echo "(current: $PROC_SYS, n/a if absent; nofile: the hard limit in $LIMITS_PATH. new: wanted, never below a higher current value)"
echo

# Notes.
for i in "${!R_KEY[@]}"; do
  if [[ ${R_CUR[$i]} == n/a && ${R_KEY[$i]} != nofile ]]; then
    if [[ ${R_OPTIONAL[$i]} == 1 ]]; then
      echo "note: ${R_KEY[$i]} is absent here (module not loaded, older kernel or a network namespace): skipped"
    else
      echo "warning: ${R_KEY[$i]} is absent under $PROC_SYS (older kernel, or a key a network namespace does not have): applying it will fail"
    fi
  fi
done
nofile_new=$(new_of nofile)
if [[ $ROLE == server ]]; then
  [[ -n $nofile_new ]] && echo "systemd: set LimitNOFILE=$nofile_new in switchboard.service (tuning/switchboard.service has 1048576, for 1M connections); limits.d applies to login sessions only"
  echo "switchboard.toml: server.max_connections = $N"
  if ((BACKLOG > 4096)) && [[ -n $(new_of net.core.somaxconn) ]]; then
    echo "switchboard.toml: server.listen_backlog = $BACKLOG (per worker listener; the default 4096 does not use a larger somaxconn)"
  fi
  if [[ -n $(new_of net.netfilter.nf_conntrack_max) && $(read_current net.netfilter.nf_conntrack_max) != n/a ]]; then
    echo "conntrack is loaded: each tracked connection costs ~320 B of kernel memory more; tuning/notrack.nft stops tracking ports 7700/7701/7710 (see tuning/README.md)"
  fi
else
  range=$(new_of net.ipv4.ip_local_port_range)
  if [[ -n $range ]]; then
    read -r lo hi <<<"$range"
    ports=$((hi - lo + 1))
    if ((ports > 0)); then
      echo "source addresses: $N connections to one server address:port need at least $(((N + ports - 1) / ports)) source addresses ($ports ephemeral ports each); see tuning/loadgen-sysctl.conf"
    fi
  fi
  [[ -n $nofile_new ]] && echo "limits: every loader process needs RLIMIT_NOFILE above its connection count: ulimit -n $nofile_new (or log in again after the drop-in is written)"
fi
if [[ -n $(new_of net.netfilter.nf_conntrack_max) && $(read_current net.netfilter.nf_conntrack_max) != n/a ]]; then
  # systemd-sysctl skips the "-" key while the module is absent: a firewall
  # that loads it later in the boot would leave the kernel's default.
  echo "conntrack at boot: net.netfilter.nf_conntrack_max applies at boot only if nf_conntrack is loaded by then; if a firewall loads it later: echo nf_conntrack > /etc/modules-load.d/nf_conntrack.conf"
fi

# The drop-ins' content.
planned_index() { # key -> its index among the planned rows, or nothing
  local i
  for i in "${!R_KEY[@]}"; do
    if [[ ${R_KEY[$i]} == "$1" ]]; then
      echo "$i"
      return
    fi
  done
}
earlier_setting() { # key -> its "key = value" line in the existing sysctl drop-in, if any
  local line
  [[ -r $SYSCTL_PATH ]] || return 0
  while IFS= read -r line; do
    if [[ $line == "$1 = "* || $line == "-$1 = "* ]]; then
      echo "$line"
      return
    fi
  done <"$SYSCTL_PATH"
}
sysctl_content() {
  local a i prefix line
  echo "# Written by tuning/apply.sh --role $ROLE --connections $N (RAM $RAM bytes, page size $PAGE_SIZE)."
  echo "# Rerun apply.sh instead of editing; why each key and its memory cost: tuning/$([[ $ROLE == server ]] && echo switchboard || echo loadgen)-sysctl.conf"
  for a in "${!ALL_KEY[@]}"; do
    [[ ${ALL_KEY[$a]} == nofile ]] && continue
    i=$(planned_index "${ALL_KEY[$a]}")
    if [[ -z $i ]]; then
      # Left out by --only: what an earlier run wrote stays.
      line=$(earlier_setting "${ALL_KEY[$a]}")
      if [[ -n $line ]]; then
        echo
        echo "# ${ALL_WHY[$a]}"
        echo "$line"
      fi
      continue
    fi
    [[ ${R_ACTION[$i]} == skip ]] && continue
    prefix=""
    [[ ${ALL_OPTIONAL[$a]} == 1 ]] && prefix="-" # absent at boot (module not loaded yet): no error
    echo
    echo "# ${R_WHY[$i]}"
    echo "$prefix${R_KEY[$i]} = ${R_NEW[$i]}"
  done
}
limits_content() {
  local u
  echo "# Written by tuning/apply.sh --role $ROLE --connections $N. Read by pam_limits at login"
  echo "# (ssh, su -, sudo -i); systemd services take LimitNOFILE= from their unit instead."
  for u in "${LIMITS_USER_LIST[@]}"; do
    printf '%-12s soft nofile %s\n' "$u" "$nofile_new"
    printf '%-12s hard nofile %s\n' "$u" "$nofile_new"
  done
  if [[ $ROLE == server ]]; then
    echo "# io_uring rings are charged to RLIMIT_MEMLOCK on kernels before 5.12."
    for u in "${LIMITS_USER_LIST[@]}"; do
      printf '%-12s soft memlock unlimited\n' "$u"
      printf '%-12s hard memlock unlimited\n' "$u"
    done
  fi
}
want_sysctl_file=0
for i in "${!R_KEY[@]}"; do
  [[ ${R_KEY[$i]} != nofile && ${R_ACTION[$i]} != skip ]] && want_sysctl_file=1
done
want_limits_file=0
[[ -n $nofile_new ]] && want_limits_file=1
same_content() { # path content -> 0 if the file holds exactly content
  [[ -f $1 ]] && cmp -s "$1" <(printf '%s\n' "$2")
}

changes=()
for i in "${!R_KEY[@]}"; do
  [[ ${R_KEY[$i]} != nofile && ${R_ACTION[$i]} == change ]] && changes+=("$i")
done

if ((DRY_RUN)); then
  echo
  echo "dry run: nothing changed."
  if ((${#changes[@]})); then
    names=()
    for i in "${changes[@]}"; do names+=("${R_KEY[$i]}"); done
    echo "would set ${#changes[@]} key(s) with sysctl -w: ${names[*]}"
  else
    echo "no kernel value needs to change."
  fi
  if ((want_sysctl_file)); then
    if same_content "$SYSCTL_PATH" "$(sysctl_content)"; then
      echo "unchanged: $SYSCTL_PATH"
    else
      echo "would write $SYSCTL_PATH"
    fi
  fi
  if ((want_limits_file)); then
    if same_content "$LIMITS_PATH" "$(limits_content)"; then
      echo "unchanged: $LIMITS_PATH"
    else
      echo "would write $LIMITS_PATH"
    fi
  fi
  exit 0
fi

# ---------------------------------------------------------------------------
# Apply. First make sure every change can be made, so a host where it
# cannot (not root, read-only /proc/sys in a container) is left untouched.
echo
errors=()
for i in "${changes[@]}"; do
  p=$(key_path "${R_KEY[$i]}")
  if [[ ! -e $p ]]; then
    errors+=("cannot set ${R_KEY[$i]} = ${R_NEW[$i]}: $p does not exist (this kernel or network namespace does not have the key)")
  elif [[ ! -w $p ]]; then
    if [[ $PROC_SYS == /proc/sys && $EUID -ne 0 ]]; then
      errors+=("cannot set ${R_KEY[$i]} = ${R_NEW[$i]}: $p is not writable: run as root")
    else
      errors+=("cannot set ${R_KEY[$i]} = ${R_NEW[$i]}: $p is not writable (read-only /proc/sys, as in most containers, or a key only the host's initial namespace may set: set it on the host, or per container with e.g. docker run --sysctl for net.* keys)")
    fi
  fi
done
dirs=()
((want_sysctl_file)) && dirs+=("$SYSCTL_DIR")
((want_limits_file)) && dirs+=("$LIMITS_DIR")
for d in ${dirs[@]+"${dirs[@]}"}; do
  e=$d # the directory, or the nearest existing parent it would be created in
  while [[ ! -e $e && $e == */* ]]; do e=${e%/*}; done
  [[ -n $e ]] || e=/
  if [[ ! -d $e || ! -w $e ]]; then
    errors+=("cannot write drop-ins into $d: $e is not a writable directory")
  fi
done
if ((${#errors[@]})); then
  for e in "${errors[@]}"; do echo "apply.sh: error: $e" >&2; done
  echo "apply.sh: nothing was changed." >&2
  exit 1
fi

done_keys=()
for i in "${changes[@]}"; do
  key=${R_KEY[$i]} value=${R_NEW[$i]}
  p=$(key_path "$key")
  if [[ $PROC_SYS == /proc/sys ]] && command -v sysctl >/dev/null; then
    out=$(sysctl -q -w "$key=$value" 2>&1) && rc=0 || rc=$?
  else
    out=$({ printf '%s\n' "$value" >"$p"; } 2>&1) && rc=0 || rc=$?
  fi
  now=$(read_current "$key")
  if ((rc != 0)) || [[ $now != "$value" ]]; then
    reason=${out:-"the kernel reads it back as '$now'"}
    echo "apply.sh: error: cannot set $key = $value: $reason" >&2
    if ((${#done_keys[@]})); then
      echo "apply.sh: already set (until reboot; no drop-in written): ${done_keys[*]}" >&2
    else
      echo "apply.sh: nothing was changed." >&2
    fi
    exit 1
  fi
  echo "set $key = $value"
  done_keys+=("$key")
done
((${#changes[@]})) || echo "no kernel value needed to change."

write_file() { # path content
  local path=$1 content=$2 tmp
  if same_content "$path" "$content"; then
    echo "unchanged: $path"
    return
  fi
  mkdir -p "$(dirname "$path")"
  tmp=$(mktemp "$path.XXXXXX")
  printf '%s\n' "$content" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$path"
  echo "wrote $path"
}
((want_sysctl_file)) && write_file "$SYSCTL_PATH" "$(sysctl_content)"
((want_limits_file)) && write_file "$LIMITS_PATH" "$(limits_content)"
echo "done."
