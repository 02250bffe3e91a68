#!/usr/bin/env bash
# Run a NATS server with JetStream as a local process, built from the Go module proxy;
# only python3 and openssl are needed (Go is fetched when the machine has none).
#
#   nats.sh install          build nats-server into the cache unless it is there;
#                            print its path on stdout
#   nats.sh path             print where it is (or would be) installed, build nothing
#   nats.sh start DIR PORT   start two servers with JetStream, each its own store:
#                            plain clients on 127.0.0.1:PORT (store DIR/jetstream, monitoring
#                            PORT+1), and TLS required on PORT+2 (store DIR/tls-jetstream,
#                            monitoring PORT+3; certificates from certs.sh in DIR/tls, CA
#                            DIR/tls/ca.pem), the TLS handshake first (handshake_first:
#                            the relay's client starts TLS before the server's INFO, so no
#                            credential goes out in plain text; plain clients get nothing).
#                            Two servers because one port taking both (allow_non_tls) is
#                            not what a TLS deployment should run
#   nats.sh stop DIR         stop the servers started in DIR (their streams stay in DIR)
#   nats.sh status DIR       exit 0 if both servers of DIR are running
#
# Users, all in one account with JetStream (a loopback test server's, not secrets):
#   a client with no credentials    the account's no_auth_user (the tests' plain clients)
#   NATS_USER / NATS_PASSWORD       a user with a password (default: relay / the constant below)
#   NATS_NKEY_USER                  an nkey user's public key (U...), if set
#
# Environment:
#   OUTBOX_RELAY_CACHE     cache root (default: $HOME/.cache/outbox-relay)
#   NATS_VERSION           nats-server version to build (default: the pin below)
#   NATS_MAX_PAYLOAD       the server's max_payload in bytes (default: 1048576, NATS's own)
#   NATS_START_TIMEOUT     seconds to wait for JetStream (default: 30)
#   NATS_STOP_TIMEOUT      seconds between SIGTERM and SIGKILL (default: 10)
#   NATS_GOMEMLIMIT        the Go runtime's soft memory limit, GOMEMLIMIT (default: 128MiB)
#   GO, GO_TOOLCHAIN       the Go to build with (see go.sh)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=SCRIPTDIR/go.sh
. "$SERVICES_DIR/go.sh"

NATS_VERSION="${NATS_VERSION:-v2.15.3}"
CACHE_ROOT="${OUTBOX_RELAY_CACHE:-$HOME/.cache/outbox-relay}"
BIN_DIR="$CACHE_ROOT/bin"
# One binary per version: bumping the pin never runs a stale server.
SERVER="$BIN_DIR/nats-server-$NATS_VERSION"
MODULE="github.com/nats-io/nats-server/v2"
START_TIMEOUT="${NATS_START_TIMEOUT:-30}"
STOP_TIMEOUT="${NATS_STOP_TIMEOUT:-10}"
MAX_PAYLOAD="${NATS_MAX_PAYLOAD:-1048576}"
USER_NAME="${NATS_USER:-relay}"
USER_PASSWORD="${NATS_PASSWORD:-relay-nats-test-secret}"

# Build once; concurrent runs (several pytest sessions) serialize on a flock, and the
# binary is installed under a temporary name and renamed, so nobody runs a half-written one.
build_server() {
  [[ -x "$SERVER" ]] && return 0
  local go_bin stage start
  if ! go_bin="$(go_binary)"; then
    die "Go is needed to build nats-server $NATS_VERSION: none was found and the $GO_TOOLCHAIN toolchain could not be fetched from the module proxy (install Go 1.22 or later, or set GO=/path/to/go)"
  fi
  mkdir -p "$BIN_DIR"
  exec 9>"$BIN_DIR/.nats.lock"
  flock 9
  # Another run may have built it while this one waited for the lock.
  if [[ ! -x "$SERVER" ]]; then
    log "building nats-server $NATS_VERSION with $go_bin (once; cached in $BIN_DIR) ..."
    start=$SECONDS
    stage="$(mktemp -d "$BIN_DIR/.build.XXXXXX")"
    go_build_env
    # CGO off gives a static binary, as NATS's own releases are. The module's root
    # package is the server's main (go install names the binary nats-server).
    if ! GOBIN="$stage" CGO_ENABLED=0 "$go_bin" install -trimpath -ldflags "-s -w" \
         "$MODULE@$NATS_VERSION" >"$stage/build.log" 2>&1; then
      tail -n 20 "$stage/build.log" >&2
      rm -rf "$stage"
      die "go install $MODULE@$NATS_VERSION failed"
    fi
    mv -f "$stage/nats-server" "$SERVER"
    rm -rf "$stage"
    log "built nats-server $NATS_VERSION in $((SECONDS - start)) s"
  fi
  exec 9>&-
}

cmd_install() {
  build_server
  printf '%s\n' "$SERVER"
}

# NAME is nats (the plain server) or nats-tls: DIR/NAME.conf, DIR/NAME.pid, DIR/NAME.log.
running_pid() { pid_from_file "$1/$2.pid" "$1/$2.conf"; }

# JetStream answers (its health check on the monitoring port says so only once the
# store is loaded), and the port is this server's.
probe_ready() {
  python3 - "$1" <<'PY'
import sys, urllib.request
try:
    url = f"http://127.0.0.1:{sys.argv[1]}/healthz"
    with urllib.request.urlopen(url, timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

# NATS config strings are quoted; a value with a quote or a backslash is refused
# rather than escaped (these are test settings).
quoted() {
  [[ "$1" != *'"'* && "$1" != *\\* ]] || die "a NATS setting may not hold a quote or a backslash: $2"
  printf '"%s"' "$1"
}

# write_config DIR NAME PORT: DIR/NAME.conf for a server on PORT (monitoring PORT+1);
# NAME nats-tls requires TLS.
write_config() {
  local dir="$1" name="$2" port="$3" nkey_line="" tls_block="" store="jetstream"
  if [[ -n "${NATS_NKEY_USER:-}" ]]; then
    [[ "$NATS_NKEY_USER" =~ ^U[A-Z2-7]{55}$ ]] || die "NATS_NKEY_USER must be a user's public nkey (U and 55 base32 characters)"
    nkey_line="{ nkey: $NATS_NKEY_USER }"
  fi
  if [[ "$name" == nats-tls ]]; then
    store="tls-jetstream"
    tls_block="tls {
  cert_file: \"$dir/tls/server.crt\"
  key_file: \"$dir/tls/server.key\"
  timeout: 5
  # TLS before INFO: the relay's client (tls_handshake_first) sends no byte in plain text.
  handshake_first: true
}"
  fi
  cat >"$dir/$name.conf" <<EOF
# Generated by scripts/services/nats.sh
server_name: outbox_$port
host: 127.0.0.1
port: $port
http: 127.0.0.1:$((port + 1))
max_payload: $MAX_PAYLOAD
$tls_block
jetstream {
  store_dir: "$dir/$store"
  max_memory_store: 64MB
  max_file_store: 2GB
}
accounts {
  RELAY {
    jetstream: enabled
    users: [
      { user: anonymous, password: $(quoted "$(python3 -c 'import secrets; print(secrets.token_hex(16))')" anonymous) }
      { user: $(quoted "$USER_NAME" NATS_USER), password: $(quoted "$USER_PASSWORD" NATS_PASSWORD) }
      $nkey_line
    ]
  }
}
# Clients without credentials are this user (the tests' consumers, the plain contract).
no_auth_user: anonymous
EOF
}

# start_one DIR NAME PORT: start that server unless it runs; wait until JetStream is up.
start_one() {
  local dir="$1" name="$2" port="$3" pid
  if pid="$(running_pid "$dir" "$name")"; then
    if probe_ready "$((port + 1))"; then
      log "$name already running in $dir (pid $pid) on 127.0.0.1:$port"
      return 0
    fi
    die "$name is running in $dir (pid $pid) but 127.0.0.1:$((port + 1)) does not answer; run '$0 stop $dir' first"
  fi
  require_free_ports "$port" "$((port + 1))"
  write_config "$dir" "$name" "$port"
  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  # GOMEMLIMIT keeps the Go heap small on a shared test machine.
  pid="$(spawn "$dir/$name.pid" "$dir/$name.log" "$deadline" \
    env GOMEMLIMIT="${NATS_GOMEMLIMIT:-128MiB}" "$SERVER" -c "$dir/$name.conf")"
  STARTING_LOG="$dir/$name.log"
  wait_ready "$pid" "$deadline" 0.1 "$name process $pid exited during startup" \
    "JetStream not up on 127.0.0.1:$port after ${START_TIMEOUT}s (killed pid $pid)" \
    probe_ready "$((port + 1))"
  log "$name ready on 127.0.0.1:$port (pid $pid) after $((SECONDS - started))s"
}

cmd_start() {
  local dir="$1" port="$2"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  build_server
  make_certs "$dir"
  mkdir -p "$dir/jetstream" "$dir/tls-jetstream"
  log "starting nats-server $NATS_VERSION with JetStream: plain on 127.0.0.1:$port, TLS on $((port + 2)), dir $dir"
  start_one "$dir" nats "$port"
  start_one "$dir" nats-tls "$((port + 2))"
}

STARTING_LOG=""
fail_start() {
  show_tail 40 "$STARTING_LOG"
  die "$*"
}

cmd_stop() {
  local dir="$1" name pid
  for name in nats nats-tls; do
    if ! pid="$(running_pid "$dir" "$name")"; then
      log "no $name running in $dir"
      rm -f "$dir/$name.pid"
      continue
    fi
    log "stopping $name (pid $pid) in $dir"
    stop_pid "$pid" "$STOP_TIMEOUT"
    rm -f "$dir/$name.pid"
    log "$name stopped"
  done
}

cmd_status() {
  local name pid status=0
  for name in nats nats-tls; do
    if pid="$(running_pid "$1" "$name")"; then
      log "$name running (pid $pid)"
    else
      log "$name not running"
      status=1
    fi
  done
  return "$status"
}

if [[ "${1:-}" == path && $# -eq 1 ]]; then
  printf '%s\n' "$SERVER"
  exit 0
fi
service_main install "$@"
