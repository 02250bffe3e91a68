#!/usr/bin/env bash
# Provision a real RabbitMQ node as a local process -- no Docker needed.
#
#   rabbitmq.sh install           apt-get install rabbitmq-server if missing (needs root/sudo)
#   rabbitmq.sh start DIR PORT    start a private node; AMQP on 127.0.0.1:PORT
#   rabbitmq.sh stop DIR          stop the node started in DIR (and its private epmd)
#   rabbitmq.sh status DIR        exit 0 if the node of DIR is running
#
#   rabbitmq.sh cluster-start DIR PORT   3 clustered nodes in DIR/node1..3 (ports below)
#   rabbitmq.sh cluster-stop DIR         stop the cluster's nodes and its epmd
#   rabbitmq.sh node-start DIR N         start node N (1-3) of the cluster in DIR again
#   rabbitmq.sh node-stop DIR N          stop node N cleanly (rabbitmqctl stop)
#   rabbitmq.sh node-kill DIR N          SIGKILL node N (no clean shutdown)
#   rabbitmq.sh node-partition DIR N     cut node N off its peers' Erlang distribution
#   rabbitmq.sh node-heal DIR N          let node N reach its peers again
#   rabbitmq.sh node-ctl DIR N ARGS...   rabbitmqctl ARGS against node N (its cookie and epmd)
#
# Each node is fully private: its own node name (outbox-PORT@localhost), data,
# logs, config, Erlang cookie (DIR/.erlang.cookie, HOME=DIR) and its own epmd.
# Ports, all bound to 127.0.0.1 only:
#   PORT      AMQP 0-9-1            (user guest / password guest, vhost /)
#   PORT+1    Erlang distribution   (override: RABBITMQ_DIST_PORT)
#   PORT+2    private epmd          (override: RABBITMQ_EPMD_PORT)
#   PORT+3    AMQPS (TLS), certificates from certs.sh in DIR/tls (CA: DIR/tls/ca.pem)
#
# A cluster's node N (1-3) has the ports of a single node at PORT+4*(N-1), except
# epmd: the three share node 1's, PORT+2 (nodes find each other through it), and
# one Erlang cookie. Clustered nodes have cluster_partition_handling = pause_minority
# and net_ticktime = RABBITMQ_NET_TICKTIME (default 10 s), so a peer cut off is
# noticed within seconds, not a minute.
#
# Environment:
#   RABBITMQ_START_TIMEOUT  seconds to wait for the node (default: 90)
#   RABBITMQ_STOP_TIMEOUT   seconds to wait for a clean stop before SIGKILL (default: 30)
#   RABBITMQ_SBIN           directory holding rabbitmq-server/rabbitmqctl (auto-detected)
#   RABBITMQ_NET_TICKTIME   a cluster's net_ticktime in seconds (default: 10)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

START_TIMEOUT="${RABBITMQ_START_TIMEOUT:-90}"
STOP_TIMEOUT="${RABBITMQ_STOP_TIMEOUT:-30}"

# Directory with the real rabbitmq-server/rabbitmqctl scripts. On Debian the
# commands in /usr/sbin are a wrapper that `su`s to the rabbitmq user and
# `cd`s to /var/lib/rabbitmq (forcing HOME=/var/lib/rabbitmq and its shared
# cookie); we call the unwrapped scripts in /usr/lib/rabbitmq/bin instead, so
# the node runs as the invoking user (root is fine) with our own HOME/cookie.
find_sbin() {
  local d cand
  if [[ -n "${RABBITMQ_SBIN:-}" ]]; then
    [[ -x "$RABBITMQ_SBIN/rabbitmq-server" ]] || return 1
    printf '%s\n' "$RABBITMQ_SBIN"
    return 0
  fi
  if [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
    printf '%s\n' /usr/lib/rabbitmq/bin
    return 0
  fi
  for d in ${PATH//:/ } /usr/sbin /usr/local/sbin; do
    cand="$d/rabbitmq-server"
    if [[ -x "$cand" ]]; then
      dirname "$(readlink -f "$cand")"
      return 0
    fi
  done
  return 1
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
  local sbin
  if sbin="$(find_sbin)"; then
    log "rabbitmq-server already installed ($sbin)"
    stop_system_service
    return 0
  fi
  command -v apt-get >/dev/null || die "rabbitmq-server not found and apt-get is unavailable"
  # Keep the package's maintainer scripts from auto-starting the system-wide
  # node (we run our own instances): a temporary policy-rc.d that denies
  # service starts, unless one already exists.
  local policy=/usr/sbin/policy-rc.d added_policy=""
  if [[ ! -e "$policy" ]]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
    added_policy=1
  fi
  log "installing rabbitmq-server with apt-get ..."
  local start=$SECONDS rc=0 aptlog
  aptlog="$(mktemp -t rabbitmq-install.XXXXXX.log)"
  {
    as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
      rabbitmq-server
  } >"$aptlog" 2>&1 || rc=$?
  if [[ -n "$added_policy" ]]; then
    as_root rm -f "$policy"
  fi
  if ((rc != 0)); then
    tail -n 30 "$aptlog" >&2
    die "apt-get install rabbitmq-server failed (rc=$rc, log: $aptlog)"
  fi
  rm -f "$aptlog"
  sbin="$(find_sbin)" || die "rabbitmq-server still not found after install"
  log "installed rabbitmq-server in $((SECONDS - start))s ($sbin)"
  stop_system_service
}

# Stop the distribution's own rabbitmq-server service if something started it.
stop_system_service() {
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    if systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
      log "stopping the system rabbitmq-server service (systemd)"
      as_root systemctl stop rabbitmq-server || true
      as_root systemctl disable rabbitmq-server >/dev/null 2>&1 || true
    fi
  elif [[ -x /etc/init.d/rabbitmq-server ]] && pgrep -u rabbitmq -f 'beam.*rabbit' >/dev/null 2>&1; then
    log "stopping the system rabbitmq-server service (init.d)"
    as_root /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true
  fi
}

# Export everything that makes the node in DIR private. Needs NODE, PORT,
# DIST_PORT, EPMD_PORT and DIR set.
export_env() {
  export HOME="$DIR"                           # -> $DIR/.erlang.cookie for server and CLI
  export RABBITMQ_NODENAME="$NODE"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$PORT"
  export RABBITMQ_DIST_PORT="$DIST_PORT"
  export RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config"
  export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
  export RABBITMQ_MNESIA_BASE="$DIR/mnesia"
  export RABBITMQ_LOG_BASE="$DIR/log"
  export RABBITMQ_PLUGINS_EXPAND_DIR="$DIR/plugins-expand"
  export RABBITMQ_PID_FILE="$DIR/rabbitmq.pid"
  export ERL_EPMD_PORT="$EPMD_PORT"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_CRASH_DUMP="$DIR/erl_crash.dump"
  # The short-lived CLI nodes (rabbitmqctl, rabbitmq-diagnostics) listen for
  # distribution too: keep them on loopback.
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

load_instance() {
  DIR="$1"
  [[ -f "$DIR/instance.env" ]] || return 1
  NODE="" PORT="" DIST_PORT="" EPMD_PORT=""
  # shellcheck source=/dev/null
  . "$DIR/instance.env"
  [[ -n "$NODE" && -n "$PORT" && -n "$DIST_PORT" && -n "$EPMD_PORT" ]] || return 1
  export_env
}

# pid of the node of DIR if alive (guarding against pid reuse), else fail.
# The node name is not on beam's command line (rabbit sets it at boot), but
# our HOME is: erl passes it as `-home DIR`.
# A node that has not written its pid file yet is found by its -home argument: a start
# that gives up must not leave it booting (a later stop, finding no pid file, would
# not stop it).
booting_pids() {
  local proc
  for proc in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$proc/cmdline" | grep -qF -- "-home $DIR "; then
      printf '%s\n' "${proc#/proc/}"
    fi
  done
}

kill_booting_node() {
  local pid pids
  pids="$(booting_pids)"
  for pid in $pids; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Gone before we return, as stop_pid waits too: its ports free, epmd told.
  for pid in $pids; do
    local waited=0
    while alive "$pid" && ((waited < 50)); do
      sleep 0.1
      waited=$((waited + 1))
    done
  done
}

running_pid() {
  pid_from_file "$DIR/rabbitmq.pid" "-home $DIR "
}

# AMQP-level probe: send the protocol header, expect a Connection.Start frame.
amqp_ready() {
  python3 - "$1" <<'PY'
import socket, struct, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
        s.settimeout(3)
        s.sendall(b"AMQP\x00\x00\x09\x01")
        hdr = s.recv(7)
        ftype, _chan, _size = struct.unpack(">BHI", hdr)
        sys.exit(0 if ftype == 1 else 1)     # METHOD frame (Connection.Start)
except Exception:
    sys.exit(1)
PY
}

node_running() {
  timeout 30 "$SBIN/rabbitmq-diagnostics" -q -n "$NODE" check_running >/dev/null 2>&1
}

node_ready() { amqp_ready "$PORT" && node_running; }

write_config() {
  cat >"$DIR/rabbitmq.conf" <<EOF
# Generated by scripts/services/rabbitmq.sh
listeners.tcp.default = 127.0.0.1:$PORT
# AMQPS on PORT+3, with the test CA of certs.sh (clients verify the broker).
listeners.ssl.default = 127.0.0.1:$TLS_PORT
ssl_options.cacertfile = $DIR/tls/ca.pem
ssl_options.certfile = $DIR/tls/server.crt
ssl_options.keyfile = $DIR/tls/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $DIST_PORT
distribution.listener.port_range.max = $DIST_PORT
# guest/guest stays usable, but only over loopback (the default).
loopback_users.guest = true
log.file.level = info
log.console = false
disk_free_limit.absolute = 50MB
EOF
  if [[ -n "$CLUSTER_EPMD_PORT" ]]; then
    cat >>"$DIR/rabbitmq.conf" <<EOF
# A node of a cluster (cluster-start): the side of a partition with fewer than half
# the nodes pauses, closing its clients, until it sees the others again.
cluster_partition_handling = pause_minority
EOF
    # A peer cut off is noticed after 0.75-1.25 net_ticktime (Erlang's default: 60 s).
    printf '[{kernel, [{net_ticktime, %s}]}].\n' "$CLUSTER_TICKTIME" >"$DIR/advanced.config"
  else
    printf '[].\n' >"$DIR/advanced.config"
  fi
  printf '[].\n' >"$DIR/enabled_plugins"          # no management plugin
  : >"$DIR/rabbitmq-env.conf"                     # don't read /etc/rabbitmq/rabbitmq-env.conf
  cat >"$DIR/instance.env" <<EOF
NODE=$NODE
PORT=$PORT
DIST_PORT=$DIST_PORT
EPMD_PORT=$EPMD_PORT
EOF
  if [[ ! -s "$DIR/.erlang.cookie" ]]; then
    (umask 077; python3 -c 'import secrets,string;print("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)),end="")' >"$DIR/.erlang.cookie")
    chmod 400 "$DIR/.erlang.cookie"
  fi
}

fail_start() {
  show_tail 20 "$DIR/startup.log"
  if [[ -f "$DIR/erl_crash.dump" ]]; then
    log "$(grep -m1 '^Slogan' "$DIR/erl_crash.dump" 2>/dev/null || true)"
  fi
  local f
  for f in "$DIR"/log/*.log; do
    [[ -f "$f" ]] || continue
    show_tail 40 "$f"
  done
  die "$*"
}

cmd_start() {
  DIR="$1" PORT="$2"
  SBIN="$(find_sbin)" || die "rabbitmq-server not installed; run '$0 install' first"
  mkdir -p "$DIR"
  DIR="$(cd "$DIR" && pwd)"
  NODE="outbox-$PORT@localhost"
  load_cluster_node
  DIST_PORT="${RABBITMQ_DIST_PORT:-$((PORT + 1))}"
  EPMD_PORT="${RABBITMQ_EPMD_PORT:-${CLUSTER_EPMD_PORT:-$((PORT + 2))}}"
  TLS_PORT="$((PORT + 3))"
  export_env

  local pid
  if pid="$(running_pid)"; then
    if amqp_ready "$PORT"; then
      log "node $NODE already running (pid $pid) on 127.0.0.1:$PORT"
      return 0
    fi
    die "node $NODE is running (pid $pid) but 127.0.0.1:$PORT is not ready; run '$0 stop $DIR' first"
  fi
  require_free_ports "$PORT" "$DIST_PORT" "$TLS_PORT"

  mkdir -p "$DIR/mnesia" "$DIR/log"
  make_certs "$DIR"
  write_config
  rm -f "$DIR/rabbitmq.pid"
  log "starting RabbitMQ node $NODE on 127.0.0.1:$PORT (dist $DIST_PORT, epmd $EPMD_PORT), dir $DIR"
  local started=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
  # -detached: erl daemonizes itself; its stdio is not inherited by callers.
  if ! (cd "$DIR" && setsid "$SBIN/rabbitmq-server" -detached </dev/null >"$DIR/startup.log" 2>&1); then
    fail_start "rabbitmq-server -detached failed"
  fi

  # Wait for the pid file, then for the node to report itself running. A node that
  # died before writing it (a port taken meanwhile: see erl_crash.dump) fails within 3
  # seconds: no process of it for 15 looks in a row. One look is not enough: -detached
  # returns after erlexec's first fork, and the beam process that carries "-home DIR"
  # appears only after a second fork and an exec (an empty look happened 1 in 30, and
  # twice in one CI run).
  local unseen=0
  while ! pid="$(running_pid)"; do
    if [[ -z "$(booting_pids)" ]] && ! pid="$(running_pid)"; then
      unseen=$((unseen + 1))
      if ((unseen >= 15)); then
        kill_booting_node # one that shows up after all must not keep the ports
        fail_start "node $NODE exited before writing $DIR/rabbitmq.pid"
      fi
    else
      unseen=0
    fi
    if ((SECONDS >= deadline)); then
      kill_booting_node
      fail_start "node $NODE did not write $DIR/rabbitmq.pid within ${START_TIMEOUT}s (killed it)"
    fi
    sleep 0.2
  done
  wait_ready "$pid" "$deadline" 0.5 "node $NODE (pid $pid) exited during startup" \
    "node $NODE not running after ${START_TIMEOUT}s (killed pid $pid)" node_ready
  log "RabbitMQ ready on 127.0.0.1:$PORT (node $NODE, pid $pid) after $((SECONDS - started))s"
}

cmd_stop() {
  if ! load_instance "$1"; then
    log "no RabbitMQ instance in $1"
    return 0
  fi
  SBIN="$(find_sbin)" || SBIN=""
  local pid=""
  if pid="$(running_pid)"; then
    log "stopping RabbitMQ node $NODE (pid $pid)"
    if [[ -n "$SBIN" ]]; then
      # `stop PIDFILE` returns once the OS process has exited.
      timeout "$STOP_TIMEOUT" "$SBIN/rabbitmqctl" -q -n "$NODE" stop "$DIR/rabbitmq.pid" \
        >>"$DIR/stop.log" 2>&1 || log "rabbitmqctl stop failed, falling back to signals"
    fi
    if alive "$pid"; then
      stop_pid "$pid" 10
    fi
  else
    log "node $NODE is not running"
    # Unless it is still booting (no pid file yet: a start that gave up on it): that
    # one would keep its ports.
    kill_booting_node
  fi
  rm -f "$DIR/rabbitmq.pid"
  stop_epmd
  log "RabbitMQ node $NODE stopped"
}

# Our private epmd (port EPMD_PORT) outlives the node; `epmd -kill` only
# succeeds when no node is registered with it any more.
stop_epmd() {
  local epmd
  epmd="$(command -v epmd || true)"
  [[ -n "$epmd" ]] || return 0
  if port_in_use "$EPMD_PORT"; then
    "$epmd" -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
  fi
}

cmd_status() {
  local pid
  if load_instance "$1" && pid="$(running_pid)"; then
    log "node $NODE running (pid $pid)"
    return 0
  fi
  log "not running"
  return 1
}

# -- cluster mode: 3 nodes in DIR/node1..3 ------------------------------------------

CLUSTER_SIZE=3

# A cluster node's DIR holds cluster-node.env: the shared epmd port and the ticktime
# (a plain `start DIR/nodeN PORT` then starts it as the cluster's node again).
load_cluster_node() {
  CLUSTER_EPMD_PORT="" CLUSTER_TICKTIME=""
  if [[ -f "$DIR/cluster-node.env" ]]; then
    # shellcheck source=/dev/null
    . "$DIR/cluster-node.env"
  fi
}

# CLUSTER_DIR (absolute) and CLUSTER_PORT of the cluster in $1.
load_cluster() {
  [[ -f "$1/cluster.env" ]] || die "no cluster in $1 (run '$0 cluster-start DIR PORT' first)"
  CLUSTER_DIR="$(cd "$1" && pwd)"
  CLUSTER_PORT=""
  # shellcheck source=/dev/null
  . "$CLUSTER_DIR/cluster.env"
  [[ "$CLUSTER_PORT" =~ ^[0-9]+$ ]] || die "$CLUSTER_DIR/cluster.env names no port"
}

node_port() { printf '%s\n' "$((CLUSTER_PORT + 4 * ($1 - 1)))"; }
node_name() { printf 'outbox-%s@localhost\n' "$(node_port "$1")"; }

check_node_number() {
  [[ "$1" =~ ^[1-3]$ ]] || die "node number must be 1-$CLUSTER_SIZE, got '$1'"
}

# rabbitmqctl against node N of the loaded cluster, with that node's environment.
node_ctl() {
  local n="$1"
  shift
  (
    load_instance "$CLUSTER_DIR/node$n" || die "node $n of $CLUSTER_DIR was never started"
    SBIN="$(find_sbin)" || die "rabbitmq-server not installed"
    timeout "$START_TIMEOUT" "$SBIN/rabbitmqctl" -q -n "$NODE" "$@"
  )
}

# How many nodes node N sees running in its cluster (0 if it does not answer).
running_nodes() {
  node_ctl "$1" cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null ||
    echo 0
}

cmd_cluster_start() {
  local dir="$1" port="$2" n pids=() failed=""
  SBIN="$(find_sbin)" || die "rabbitmq-server not installed; run '$0 install' first"
  mkdir -p "$dir"
  printf 'CLUSTER_PORT=%s\n' "$port" >"$dir/cluster.env"
  load_cluster "$dir"
  for n in 1 2 3; do
    mkdir -p "$CLUSTER_DIR/node$n"
    printf 'CLUSTER_EPMD_PORT=%s\nCLUSTER_TICKTIME=%s\n' "$((port + 2))" "${RABBITMQ_NET_TICKTIME:-10}" \
      >"$CLUSTER_DIR/node$n/cluster-node.env"
  done
  # One Erlang cookie for the three nodes and their CLI (HOME is each node's DIR).
  if [[ ! -s "$CLUSTER_DIR/node1/.erlang.cookie" ]]; then
    (umask 077; python3 -c 'import secrets,string;print("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)),end="")' >"$CLUSTER_DIR/node1/.erlang.cookie")
  fi
  for n in 2 3; do
    if ! cmp -s "$CLUSTER_DIR/node1/.erlang.cookie" "$CLUSTER_DIR/node$n/.erlang.cookie"; then
      rm -f "$CLUSTER_DIR/node$n/.erlang.cookie"
      cp "$CLUSTER_DIR/node1/.erlang.cookie" "$CLUSTER_DIR/node$n/.erlang.cookie"
    fi
  done
  chmod 400 "$CLUSTER_DIR"/node*/.erlang.cookie
  local started=$SECONDS
  # Node 1 first: it starts the shared epmd. Then 2 and 3 side by side (an Erlang
  # start is the slow part), and they join node 1 one at a time.
  (cmd_start "$CLUSTER_DIR/node1" "$(node_port 1)") || { cmd_cluster_stop "$CLUSTER_DIR"; die "node 1 did not start"; }
  for n in 2 3; do
    (cmd_start "$CLUSTER_DIR/node$n" "$(node_port "$n")") &
    pids+=("$!")
  done
  for n in "${pids[@]}"; do
    wait "$n" || failed=1
  done
  if [[ -n "$failed" ]]; then
    cmd_cluster_stop "$CLUSTER_DIR"
    die "a node of the cluster in $CLUSTER_DIR did not start"
  fi
  for n in 2 3; do
    if node_ctl 1 cluster_status --formatter json 2>/dev/null | grep -qF "\"$(node_name "$n")\""; then
      continue  # already a member (a cluster-start of a running cluster)
    fi
    log "node $n joins $(node_name 1)"
    if ! { node_ctl "$n" stop_app && node_ctl "$n" join_cluster "$(node_name 1)" && node_ctl "$n" start_app; } \
      >>"$CLUSTER_DIR/node$n/join.log" 2>&1; then
      show_tail 20 "$CLUSTER_DIR/node$n/join.log"
      cmd_cluster_stop "$CLUSTER_DIR"
      die "node $n could not join the cluster"
    fi
  done
  local deadline=$((SECONDS + START_TIMEOUT))
  until [[ "$(running_nodes 1)" == "$CLUSTER_SIZE" ]]; do
    if ((SECONDS >= deadline)); then
      cmd_cluster_stop "$CLUSTER_DIR"
      die "the cluster in $CLUSTER_DIR did not show $CLUSTER_SIZE running nodes within ${START_TIMEOUT}s"
    fi
    sleep 0.5
  done
  log "RabbitMQ cluster of $CLUSTER_SIZE ready after $((SECONDS - started))s: AMQP on 127.0.0.1:$(node_port 1),$(node_port 2),$(node_port 3)"
}

cmd_cluster_stop() {
  local n pids=()
  if [[ ! -f "$1/cluster.env" ]]; then
    log "no RabbitMQ cluster in $1"
    return 0
  fi
  load_cluster "$1"
  # Side by side: a teardown; the shared epmd goes with the last node.
  for n in 1 2 3; do
    (cmd_stop "$CLUSTER_DIR/node$n") &
    pids+=("$!")
  done
  for n in "${pids[@]}"; do
    wait "$n" || true
  done
  (load_instance "$CLUSTER_DIR/node1" && stop_epmd) || true
  log "RabbitMQ cluster in $CLUSTER_DIR stopped"
}

cmd_node_start() { (cmd_start "$CLUSTER_DIR/node$1" "$(node_port "$1")"); }
cmd_node_stop() { (cmd_stop "$CLUSTER_DIR/node$1"); }

cmd_node_kill() {
  (
    load_instance "$CLUSTER_DIR/node$1" || die "node $1 of $CLUSTER_DIR was never started"
    local pid deadline
    if ! pid="$(running_pid)"; then
      log "node $NODE is not running"
      return 0
    fi
    log "SIGKILL to node $NODE (pid $pid)"
    kill -KILL "$pid"
    deadline=$((SECONDS + 10))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    ! alive "$pid" || die "pid $pid survived SIGKILL"
    rm -f "$DIR/rabbitmq.pid"
  )
}

# A partition at the Erlang distribution layer, without root: node N takes a cookie
# for its peers that neither side has, and drops its links to them. Reconnects fail
# the handshake both ways, so the peers see N down, and N sees itself in the minority
# (pause_minority: it stops serving clients). Its AMQP clients and the CLI (whose
# cookie is unchanged) still reach it: a split between the nodes with the clients'
# network intact. node-heal gives N its peers' cookie back and reconnects.
peer_list() {
  local p peers=""
  for p in 1 2 3; do
    [[ "$p" == "$1" ]] || peers="${peers:+$peers, }'$(node_name "$p")'"
  done
  printf '[%s]\n' "$peers"
}

cmd_node_partition() {
  log "partitioning $(node_name "$1") from its peers"
  node_ctl "$1" eval "[begin erlang:set_cookie(P, 'outbox-partitioned'), erlang:disconnect_node(P) end || P <- $(peer_list "$1")], ok." >/dev/null
}

cmd_node_heal() {
  log "healing the partition of $(node_name "$1")"
  node_ctl "$1" eval "[begin erlang:set_cookie(P, erlang:get_cookie()), net_kernel:connect_node(P) end || P <- $(peer_list "$1")], ok." >/dev/null
}

cluster_main() {
  local sub="$1"
  shift
  case "$sub" in
    cluster-start)
      [[ $# -eq 2 ]] || usage
      [[ "$2" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$2'"
      cmd_cluster_start "$1" "$2" ;;
    cluster-stop)
      [[ $# -eq 1 ]] || usage
      cmd_cluster_stop "$1" ;;
    node-start|node-stop|node-kill|node-partition|node-heal)
      [[ $# -eq 2 ]] || usage
      check_node_number "$2"
      load_cluster "$1"
      "cmd_${sub//-/_}" "$2" ;;
    node-ctl)
      [[ $# -ge 3 ]] || usage
      check_node_number "$2"
      load_cluster "$1"
      node_ctl "${@:2}" ;;
    *) usage ;;
  esac
}

case "${1:-}" in
  cluster-*|node-*) cluster_main "$@" ;;
  *) service_main install "$@" ;;
esac
