#!/usr/bin/env bash
# Run Shopify's toxiproxy (a TCP proxy that injects network faults on demand: latency,
# bandwidth, black holes, resets, sliced or cut streams) as a local process, built from
# the Go module proxy; only python3 is needed (Go is fetched when the machine has none).
#
#   toxiproxy.sh install          build toxiproxy-server into the cache unless it is there;
#                                 print its path on stdout
#   toxiproxy.sh path             print where it is (or would be) installed, build nothing
#   toxiproxy.sh start DIR PORT   start a server whose HTTP API is on 127.0.0.1:PORT
#                                 (builds it first if needed); proxies are made through the API
#   toxiproxy.sh stop DIR         stop the server started in DIR
#   toxiproxy.sh status DIR       exit 0 if the server of DIR is running
#
# Environment:
#   OUTBOX_RELAY_CACHE        cache root (default: $HOME/.cache/outbox-relay)
#   TOXIPROXY_VERSION         version to build (default: the pin below)
#   TOXIPROXY_START_TIMEOUT   seconds to wait for the API (default: 30)
#   TOXIPROXY_STOP_TIMEOUT    seconds between SIGTERM and SIGKILL (default: 10)
#   TOXIPROXY_LOG_LEVEL       the server's LOG_LEVEL (default: warn; info logs every connection)
#   GO, GO_TOOLCHAIN          the Go to build with (see go.sh)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=SCRIPTDIR/go.sh
. "$SERVICES_DIR/go.sh"

TOXIPROXY_VERSION="${TOXIPROXY_VERSION:-v2.12.0}"
CACHE_ROOT="${OUTBOX_RELAY_CACHE:-$HOME/.cache/outbox-relay}"
BIN_DIR="$CACHE_ROOT/bin"
# One binary per version: bumping the pin never runs a stale server.
SERVER="$BIN_DIR/toxiproxy-server-$TOXIPROXY_VERSION"
MODULE="github.com/Shopify/toxiproxy/v2"
START_TIMEOUT="${TOXIPROXY_START_TIMEOUT:-30}"
STOP_TIMEOUT="${TOXIPROXY_STOP_TIMEOUT:-10}"

# Build once; concurrent runs (several pytest sessions) serialize on a flock, and the
# binary is installed under a temporary name and renamed, so nobody runs a half-written one.
build_server() {
  [[ -x "$SERVER" ]] && return 0
  local go_bin stage start
  if ! go_bin="$(go_binary)"; then
    die "Go is needed to build toxiproxy $TOXIPROXY_VERSION: none was found and the $GO_TOOLCHAIN toolchain could not be fetched from the module proxy (install Go 1.22 or later, or set GO=/path/to/go)"
  fi
  mkdir -p "$BIN_DIR"
  exec 9>"$BIN_DIR/.toxiproxy.lock"
  flock 9
  # Another run may have built it while this one waited for the lock.
  if [[ ! -x "$SERVER" ]]; then
    log "building toxiproxy-server $TOXIPROXY_VERSION with $go_bin (once; cached in $BIN_DIR) ..."
    start=$SECONDS
    stage="$(mktemp -d "$BIN_DIR/.build.XXXXXX")"
    go_build_env
    # CGO off gives a static binary, as toxiproxy's own releases are; the version is
    # stamped as its Makefile does (GET /version answers it). The server's package is
    # cmd/server (its releases rename the binary toxiproxy-server; so does this).
    if ! GOBIN="$stage" CGO_ENABLED=0 "$go_bin" install -trimpath \
         -ldflags "-s -w -X $MODULE.Version=${TOXIPROXY_VERSION#v}" \
         "$MODULE/cmd/server@$TOXIPROXY_VERSION" >"$stage/build.log" 2>&1; then
      tail -n 20 "$stage/build.log" >&2
      rm -rf "$stage"
      die "go install $MODULE/cmd/server@$TOXIPROXY_VERSION failed"
    fi
    mv -f "$stage/server" "$SERVER"
    rm -rf "$stage"
    log "built toxiproxy-server $TOXIPROXY_VERSION in $((SECONDS - start)) s"
  fi
  exec 9>&-
}

cmd_install() {
  build_server
  printf '%s\n' "$SERVER"
}

running_pid() { pid_from_file "$1/toxiproxy.pid" "$1/"; }

# The API answers and is toxiproxy's (another program on the port would not say so).
probe_ready() {
  python3 - "$1" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/version", timeout=2) as response:
        sys.exit(0 if response.status == 200 and b"version" in response.read() else 1)
except OSError:
    sys.exit(1)
PY
}

cmd_start() {
  local dir="$1" port="$2" pid
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"

  if pid="$(running_pid "$dir")"; then
    if probe_ready "$port"; then
      log "toxiproxy already running in $dir (pid $pid) on 127.0.0.1:$port"
      return 0
    fi
    die "a toxiproxy is running in $dir (pid $pid) but 127.0.0.1:$port does not answer; run '$0 stop $dir' first"
  fi
  require_free_ports "$port"
  build_server

  # The server starts with no proxies ([] in its config file); the file's path also puts
  # DIR on the command line, which is what running_pid checks against pid reuse.
  printf '[]\n' >"$dir/proxies.json"
  log "starting toxiproxy $TOXIPROXY_VERSION, API on 127.0.0.1:$port, dir $dir"
  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  pid="$(spawn "$dir/toxiproxy.pid" "$dir/toxiproxy.log" "$deadline" \
    env LOG_LEVEL="${TOXIPROXY_LOG_LEVEL:-warn}" "$SERVER" -host 127.0.0.1 -port "$port" -config "$dir/proxies.json")"

  STARTING_DIR="$dir"
  wait_ready "$pid" "$deadline" 0.1 "toxiproxy process $pid exited during startup" \
    "toxiproxy's API not up on 127.0.0.1:$port after ${START_TIMEOUT}s (killed pid $pid)" \
    probe_ready "$port"
  log "toxiproxy ready on 127.0.0.1:$port (pid $pid) after $((SECONDS - started))s"
}

STARTING_DIR=""
fail_start() {
  show_tail 40 "$STARTING_DIR/toxiproxy.log"
  die "$*"
}

cmd_stop() {
  local dir="$1" pid
  if ! pid="$(running_pid "$dir")"; then
    log "no toxiproxy running in $dir"
    rm -f "$dir/toxiproxy.pid"
    return 0
  fi
  log "stopping toxiproxy (pid $pid) in $dir"
  stop_pid "$pid" "$STOP_TIMEOUT"
  rm -f "$dir/toxiproxy.pid"
  log "toxiproxy stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid "$1")"; then
    log "running (pid $pid)"
    return 0
  fi
  log "not running"
  return 1
}

if [[ "${1:-}" == path && $# -eq 1 ]]; then
  printf '%s\n' "$SERVER"
  exit 0
fi
service_main install "$@"
