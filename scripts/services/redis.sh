#!/usr/bin/env bash
# Run a real Redis (Debian's redis-server, 7.0 on bookworm) as a local process -- no Docker.
#
#   redis.sh install            apt-get install redis-server if missing (needs root/sudo),
#                               and stop the system service the package starts
#   redis.sh start DIR PORT     start a private server: RESP on 127.0.0.1:PORT, TLS on PORT+1
#   redis.sh stop DIR           SHUTDOWN by SIGTERM (the AOF is flushed), SIGKILL after the grace
#   redis.sh kill DIR           SIGKILL the server of DIR (no clean shutdown)
#   redis.sh status DIR         exit 0 if the server of DIR is running and answers PING
#
# Durability as an outbox needs it: appendonly yes, appendfsync always. The relay marks a
# row dispatched once XADD is answered; with `everysec` an answered XADD can be lost with
# the last second of the AOF when the machine (not just the process) goes down, and the
# row would then be gone from the outbox too. `always` fsyncs the AOF before the reply.
# No RDB snapshots (save ""): the AOF is the data. DIR/data holds it; a stopped or killed
# DIR starts again on the same PORT with its streams.
#
# Users (ACL file DIR/users.acl, written at each start):
#   default   no password, every command and key: loopback test readers and admin
#   relay     password REDIS_RELAY_PASSWORD; only XADD, EVAL (the adapter's ordered runs
#             call XADD inside a script, checked against the same rules), PING and INFO,
#             on keys matching REDIS_RELAY_KEYS
# TLS on PORT+1 (tls-port), certificates from certs.sh in DIR/tls (CA: DIR/tls/ca.pem);
# clients need no certificate of their own (tls-auth-clients no).
#
# Environment:
#   REDIS_SERVER           the redis-server binary (default: redis-server on PATH)
#   REDIS_RELAY_PASSWORD   the relay user's password (default: relay-test-secret)
#   REDIS_RELAY_KEYS       the relay user's key pattern (default: secure-*)
#   REDIS_START_TIMEOUT    seconds to wait for PING (default: 30)
#   REDIS_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL (default: 15)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

START_TIMEOUT="${REDIS_START_TIMEOUT:-30}"
STOP_TIMEOUT="${REDIS_STOP_TIMEOUT:-15}"

find_server() {
  local PATH="$PATH:/usr/bin:/usr/sbin:/usr/local/bin"
  command -v "${REDIS_SERVER:-redis-server}"
}

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

cmd_install() {
  local server
  if server="$(find_server)"; then
    log "redis-server already installed ($server)"
    stop_system_service
    return 0
  fi
  command -v apt-get >/dev/null || die "redis-server not found and apt-get is unavailable"
  # The package's maintainer scripts would start a system-wide server on 6379: a
  # temporary policy-rc.d denies service starts, unless one already exists.
  local policy=/usr/sbin/policy-rc.d added_policy="" rc=0
  if [[ ! -e "$policy" ]]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
    added_policy=1
  fi
  log "installing redis-server with apt-get ..."
  {
    as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
  } >&2 || rc=$?
  [[ -z "$added_policy" ]] || as_root rm -f "$policy"
  ((rc == 0)) || die "apt-get install redis-server failed (rc=$rc)"
  find_server >/dev/null || die "redis-server still not found after install"
  stop_system_service
}

# Stop the distribution's own server if something started it: it would hold 6379 and
# memory, and is none of ours.
stop_system_service() {
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    if systemctl is-active --quiet redis-server 2>/dev/null; then
      log "stopping the system redis-server service (systemd)"
      as_root systemctl stop redis-server || true
      as_root systemctl disable redis-server >/dev/null 2>&1 || true
    fi
  elif [[ -x /etc/init.d/redis-server ]] && pgrep -u redis -x redis-server >/dev/null 2>&1; then
    log "stopping the system redis-server service (init.d)"
    as_root /etc/init.d/redis-server stop >/dev/null 2>&1 || true
  fi
}

running_pid() { pid_from_file "$1/redis.pid" "$1/redis.conf"; }

# PING answered +PONG (not -LOADING while the AOF is read back): the server takes commands.
probe_ready() {
  python3 - "$1" <<'PY'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
        s.settimeout(3)
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

write_config() {
  local dir="$1" port="$2"
  mkdir -p "$dir/data"
  make_certs "$dir"
  # The ACL file is read at start; the relay user's password and keys from the environment.
  umask 077
  cat >"$dir/users.acl" <<EOF
user default on nopass ~* &* +@all
user relay on >${REDIS_RELAY_PASSWORD:-relay-test-secret} ~${REDIS_RELAY_KEYS:-secure-*} resetchannels -@all +xadd +eval +ping +info
EOF
  cat >"$dir/redis.conf" <<EOF
bind 127.0.0.1
protected-mode yes
port $port
tls-port $((port + 1))
tls-cert-file $dir/tls/server.crt
tls-key-file $dir/tls/server.key
tls-ca-cert-file $dir/tls/ca.pem
tls-auth-clients no
dir $dir/data
appendonly yes
appendfsync always
save ""
daemonize no
logfile ""
proc-title-template "{title} {listen-addr} {server-mode} {config-file}"
aclfile $dir/users.acl
EOF
  umask 022
}

cmd_start() {
  local dir="$1" port="$2" pid server
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if pid="$(running_pid "$dir")"; then
    if probe_ready "$port"; then
      log "redis already running in $dir (pid $pid) on 127.0.0.1:$port"
      return 0
    fi
    die "a redis-server is running in $dir (pid $pid) but 127.0.0.1:$port does not answer; run '$0 stop $dir' first"
  fi
  server="$(find_server)" || die "redis-server not found: run '$0 install' (apt-get install redis-server)"
  require_free_ports "$port" "$((port + 1))"
  write_config "$dir" "$port"
  printf '%s\n' "$port" >"$dir/port"  # for status
  log "starting redis-server, RESP on 127.0.0.1:$port, TLS on $((port + 1)), dir $dir"
  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  # The config file's path on the command line is what running_pid checks against pid reuse.
  pid="$(spawn "$dir/redis.pid" "$dir/redis.log" "$deadline" "$server" "$dir/redis.conf")"
  STARTING_DIR="$dir"
  wait_ready "$pid" "$deadline" 0.1 "redis-server $pid exited during startup" \
    "redis-server not answering PING on 127.0.0.1:$port after ${START_TIMEOUT}s (killed pid $pid)" \
    probe_ready "$port"
  log "redis ready on 127.0.0.1:$port (pid $pid) after $((SECONDS - started))s"
}

STARTING_DIR=""
fail_start() {
  show_tail 40 "$STARTING_DIR/redis.log"
  die "$*"
}

cmd_stop() {
  local dir="$1" pid
  if ! pid="$(running_pid "$dir")"; then
    log "no redis-server running in $dir"
    rm -f "$dir/redis.pid"
    return 0
  fi
  log "stopping redis-server (pid $pid) in $dir"
  stop_pid "$pid" "$STOP_TIMEOUT"
  rm -f "$dir/redis.pid"
  log "redis-server stopped"
}

cmd_kill() {
  local dir="$1" pid
  pid="$(running_pid "$dir")" || { log "no redis-server running in $dir"; return 0; }
  kill -KILL "$pid" 2>/dev/null || true
  while alive "$pid"; do sleep 0.05; done
  rm -f "$dir/redis.pid"
  log "redis-server (pid $pid) killed"
}

cmd_status() {
  local pid
  if pid="$(running_pid "$1")" && probe_ready "$(cat "$1/port")"; then
    log "running (pid $pid)"
    return 0
  fi
  log "not running"
  return 1
}

if [[ "${1:-}" == kill && $# -eq 2 ]]; then
  [[ -d "$2" ]] || { log "nothing to kill: $2 does not exist"; exit 0; }
  cmd_kill "$(cd "$2" && pwd)"
  exit 0
fi
service_main install "$@"
