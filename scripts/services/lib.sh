# shellcheck shell=bash
# What kafka.sh and rabbitmq.sh share; sourced by them, not run. It gives them their
# command line (service_main), logging, pid and port checks, the wait for readiness
# and the stop of a broker process.
#
# The sourcing script defines the broker's part:
#   cmd_start DIR PORT    DIR as given, PORT a number
#   cmd_stop DIR          DIR absolute and existing
#   cmd_status DIR        DIR absolute and existing
#   cmd_SETUP             the setup command named in `service_main SETUP "$@"` (no arguments)
#   fail_start MESSAGE    print the tail of the broker's logs, then die MESSAGE
# and its header comment, the lines after the shebang, is its help text.

SERVICES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVICE_SCRIPT="${BASH_SOURCE[1]}"   # the script that sourced this file
SERVICE_NAME="${SERVICE_SCRIPT##*/}"

log() { printf '%s: %s\n' "$SERVICE_NAME" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
  # The header comment of the script is the help text.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SERVICE_SCRIPT" >&2
  exit "${1:-2}"
}

# The command line both scripts have: SETUP, start DIR PORT, stop DIR, status DIR, help.
service_main() {
  local setup="$1"; shift
  [[ $# -ge 1 ]] || usage
  local sub="$1" dir; shift
  case "$sub" in
    "$setup") [[ $# -eq 0 ]] || usage; "cmd_$setup" ;;
    start)
      [[ $# -eq 2 ]] || usage
      [[ "$2" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$2'"
      cmd_start "$1" "$2" ;;
    stop)
      [[ $# -eq 1 ]] || usage
      if [[ ! -d "$1" ]]; then
        log "nothing to stop: $1 does not exist"
        return 0
      fi
      cmd_stop "$(cd "$1" && pwd)" ;;
    status)
      [[ $# -eq 1 ]] || usage
      dir="$(cd "$1" 2>/dev/null && pwd)" || { log "not running"; return 1; }
      cmd_status "$dir" ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
  esac
}

# True if PID exists and is not a zombie (an exited child that nobody reaped
# yet still answers kill -0, e.g. when PID 1 of a container does not reap).
alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# The pid in FILE if that process is alive and its command line contains NEEDLE,
# else fail. NEEDLE guards against pid reuse: it names this broker's DIR.
pid_from_file() {
  local file="$1" needle="$2" pid
  [[ -f "$file" ]] || return 1
  # Whitespace aside, only digits: "12 34" is not pid 1234.
  pid="$(tr -d '[:space:]' 2>/dev/null <"$file")" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle" || return 1
  printf '%s\n' "$pid"
}

port_in_use() {
  python3 -c '
import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
' "$1"
}

require_free_ports() {
  local p
  for p in "$@"; do
    if port_in_use "$p"; then
      die "127.0.0.1:$p is already in use by another process"
    fi
  done
}

# Certificates for the broker's TLS listener in DIR/tls (CA: DIR/tls/ca.pem).
make_certs() { "$SERVICES_DIR/certs.sh" "$1/tls"; }

# Start COMMAND in a session of its own (signals aimed at the caller's process group
# do not reach it), stdin from /dev/null, its output to LOG, and print its pid once
# PIDFILE holds it: the inner shell writes its own pid, then execs COMMAND (same pid).
# Dies if that has not happened by DEADLINE (a $SECONDS value).
#   pid="$(spawn PIDFILE LOG DEADLINE COMMAND...)"
spawn() {
  local pidfile="$1" output="$2" deadline="$3"
  shift 3
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # $$ is for the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >"$output" 2>&1 &
  while [[ ! -s "$pidfile" ]]; do
    ((SECONDS < deadline)) || die "$1 did not start"
    sleep 0.05
  done
  cat "$pidfile"
}

# Poll READY-COMMAND every INTERVAL seconds until it succeeds. fail_start with
# EXITED-MESSAGE if PID dies first, or, once DEADLINE (a $SECONDS value) has
# passed, SIGKILL PID and fail_start with TIMEOUT-MESSAGE.
#   wait_ready PID DEADLINE INTERVAL EXITED-MESSAGE TIMEOUT-MESSAGE READY-COMMAND...
wait_ready() {
  local pid="$1" deadline="$2" interval="$3" exited="$4" timed_out="$5"
  shift 5
  while :; do
    if ! alive "$pid"; then
      fail_start "$exited"
    fi
    if "$@"; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      kill -KILL "$pid" 2>/dev/null || true
      fail_start "$timed_out"
    fi
    sleep "$interval"
  done
}

# SIGTERM PID and wait up to GRACE seconds for it to exit; then SIGKILL it and
# wait up to 10 more. Dies if it survives that.
stop_pid() {
  local pid="$1" grace="$2" deadline
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + grace))
  while alive "$pid" && ((SECONDS < deadline)); do
    sleep 0.2
  done
  if alive "$pid"; then
    log "pid $pid still alive after ${grace}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    ! alive "$pid" || die "pid $pid survived SIGKILL"
  fi
}

# For fail_start: the last LINES lines of FILE, under a header, if it exists.
show_tail() {
  local lines="$1" file="$2"
  log "---- tail of $file ----"
  tail -n "$lines" "$file" >&2 2>/dev/null || true
}
