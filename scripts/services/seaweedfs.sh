#!/usr/bin/env bash
# Run SeaweedFS (an S3-compatible object store) as a local process: one `weed server`
# with master, volume server, filer and S3 gateway, built from the Go module proxy;
# only python3 is needed (Go is fetched when the machine has none).
#
#   seaweedfs.sh install          build weed into the cache unless it is there; print its path
#   seaweedfs.sh path             print where it is (or would be) installed, build nothing
#   seaweedfs.sh start DIR PORT   start a store with its data in DIR (builds weed first if
#                                 needed): S3 over HTTP on 127.0.0.1:PORT, S3 over TLS on
#                                 PORT+1, its internal ports in PORT+2..PORT+9
#   seaweedfs.sh stop DIR         stop the store started in DIR (its data stays)
#   seaweedfs.sh status DIR       exit 0 if the store of DIR is running
#
# Environment:
#   OUTBOX_RELAY_CACHE          cache root (default: $HOME/.cache/outbox-relay)
#   SEAWEEDFS_VERSION           module version to build (default: the pin below)
#   SEAWEEDFS_ACCESS_KEY        the S3 admin identity's access key (default: outbox-relay-test)
#   SEAWEEDFS_SECRET_KEY        and its secret key (default: the test constant below)
#   SEAWEEDFS_START_TIMEOUT     seconds to wait until a bucket can be made (default: 60)
#   SEAWEEDFS_STOP_TIMEOUT      seconds between SIGTERM and SIGKILL (default: 15)
#   SEAWEEDFS_LOG_LEVEL         glog verbosity, -v (default: 0)
#   SEAWEEDFS_GOMEMLIMIT        the Go runtime's soft memory limit, GOMEMLIMIT (default: 96MiB)
#   GO, GO_TOOLCHAIN            the Go to build with (see go.sh)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=SCRIPTDIR/go.sh
. "$SERVICES_DIR/go.sh"

# SeaweedFS tags no Go module versions: the pin is the pseudo-version the module proxy
# serves for commit 7506e5f91cd6 (weed 4.53).
SEAWEEDFS_VERSION="${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
CACHE_ROOT="${OUTBOX_RELAY_CACHE:-$HOME/.cache/outbox-relay}"
BIN_DIR="$CACHE_ROOT/bin"
# One binary per version: bumping the pin never runs a stale server.
SERVER="$BIN_DIR/weed-$SEAWEEDFS_VERSION"
MODULE="github.com/seaweedfs/seaweedfs"
START_TIMEOUT="${SEAWEEDFS_START_TIMEOUT:-60}"
STOP_TIMEOUT="${SEAWEEDFS_STOP_TIMEOUT:-15}"
MEMORY_LIMIT="${SEAWEEDFS_GOMEMLIMIT:-96MiB}"
# A loopback test store's credentials, as kafka.sh's SCRAM user: not a secret.
ACCESS_KEY="${SEAWEEDFS_ACCESS_KEY:-outbox-relay-test}"
SECRET_KEY="${SEAWEEDFS_SECRET_KEY:-Qm9XbGF5LXRlc3Qtc2VjcmV0LWtleS0wMDAx}"

# Build once; concurrent runs (several pytest sessions) serialize on a flock, and the
# binary is installed under a temporary name and renamed, so nobody runs a half-written one.
#
# Not `go install $MODULE/weed@$SEAWEEDFS_VERSION`, as toxiproxy.sh does: SeaweedFS's
# go.mod has a replace directive (go-bip39), and go install refuses a module@version whose
# go.mod has one ("must not contain directives that would cause it to be interpreted
# differently than if it were the main module"), whatever GOFLAGS says. So the module's
# source is fetched from the same module proxy (go mod download, checked against
# sum.golang.org) and built as the main module, as its own Makefile does, which is what
# the replace is for. -mod=readonly: its go.sum must be complete, nothing is written
# into the module cache.
build_server() {
  [[ -x "$SERVER" ]] && return 0
  local go_bin stage start src
  if ! go_bin="$(go_binary)"; then
    die "Go is needed to build SeaweedFS $SEAWEEDFS_VERSION: none was found and the $GO_TOOLCHAIN toolchain could not be fetched from the module proxy (install Go 1.22 or later, or set GO=/path/to/go)"
  fi
  mkdir -p "$BIN_DIR"
  exec 9>"$BIN_DIR/.seaweedfs.lock"
  flock 9
  # Another run may have built it while this one waited for the lock.
  if [[ ! -x "$SERVER" ]]; then
    log "building weed (SeaweedFS $SEAWEEDFS_VERSION) with $go_bin (once, several minutes; cached in $BIN_DIR) ..."
    start=$SECONDS
    stage="$(mktemp -d "$BIN_DIR/.build.XXXXXX")"
    go_build_env
    # Outside any module or workspace, so that the download is the only thing go resolves.
    if ! src="$(cd "$stage" && GOWORK=off GOFLAGS=-mod=mod "$go_bin" mod download -json "$MODULE@$SEAWEEDFS_VERSION" 2>"$stage/build.log" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')" || [[ ! -f "$src/go.mod" ]]; then
      tail -n 20 "$stage/build.log" >&2
      rm -rf "$stage"
      die "go mod download $MODULE@$SEAWEEDFS_VERSION failed"
    fi
    # CGO off gives a static binary, as SeaweedFS's own releases are; the commit is
    # stamped as its release builds do (weed version prints it).
    if ! (cd "$src" && GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0 "$go_bin" build -trimpath \
         -ldflags "-s -w -X $MODULE/weed/util/version.COMMIT=${SEAWEEDFS_VERSION##*-}" \
         -o "$stage/weed" ./weed) >>"$stage/build.log" 2>&1; then
      tail -n 20 "$stage/build.log" >&2
      rm -rf "$stage"
      die "go build $MODULE/weed@$SEAWEEDFS_VERSION failed"
    fi
    mv -f "$stage/weed" "$SERVER"
    rm -rf "$stage"
    log "built weed $SEAWEEDFS_VERSION in $((SECONDS - start)) s"
  fi
  exec 9>&-
}

cmd_install() {
  build_server
  printf '%s\n' "$SERVER"
}

running_pid() { pid_from_file "$1/seaweedfs.pid" "$1/"; }

# The store's ports, from its base PORT: the S3 gateway's HTTP and HTTPS listeners first,
# then the internal ones. SeaweedFS puts a component's gRPC port at its HTTP port + 10000
# unless told otherwise; from a block below the ephemeral range (tests/services.py
# stable_port_block) that lands inside it, where an outgoing connection can take the port
# while the store is stopped, so every gRPC port is set, inside the block. PORT+9 is
# left free.
s3_https_port() { echo $(($1 + 1)); }
internal_ports() { local p; for p in 2 3 4 5 6 7 8; do echo $(($1 + p)); done; }

# How the store answers, with python3 only (no S3 client here): QUICK checks that the S3
# gateway answers over HTTP and over HTTPS (the CA of DIR/certs verifies it) with an S3
# XML error to an unsigned request, which proves the gateway is up and checks signatures.
# FULL also makes a bucket, writes an object, and deletes both with the admin identity's
# credentials (a request signed with AWS Signature V4): that needs the filer (bucket
# metadata), the master (a volume assigned) and the volume server (the data), so a store
# that passes takes a test's first request.
#   probe_ready quick|full DIR PORT [UNTIL]   UNTIL: epoch seconds no request outlasts
probe_ready() {
  local mode="$1" dir="$2" port="$3" until="${4:-$(($(date +%s) + 10))}"
  python3 - "$mode" "$port" "$dir/certs/ca.pem" "$until" <<'PY'
import datetime, hashlib, hmac, http.client, os, ssl, sys, time, urllib.error, urllib.request

mode, port, ca_file, until = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
access, secret = os.environ["PROBE_ACCESS_KEY"], os.environ["PROBE_SECRET_KEY"]
tls = ssl.create_default_context(cafile=ca_file)
# No proxy: the store is on loopback, whatever HTTP_PROXY says.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls))


def call(method, path, body=b"", *, signed=True, scheme="http"):
    host = f"127.0.0.1:{port if scheme == 'http' else port + 1}"
    headers = {}
    if signed:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        payload = hashlib.sha256(body).hexdigest()
        headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": now}
        names = ";".join(sorted(headers))
        canonical = "\n".join([method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", names, payload])
        scope = f"{now[:8]}/us-east-1/s3/aws4_request"
        text = "\n".join(["AWS4-HMAC-SHA256", now, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + secret).encode()
        for part in scope.split("/"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={names}, Signature={signature}"
    request = urllib.request.Request(f"{scheme}://{host}{path}", data=body or None, method=method, headers=headers)
    # Long enough for a write held by the master's warm-up after a restart (it answers
    # then, no need to ask again), never past the start's deadline.
    timeout = max(1.0, min(20.0, until - time.time()))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


try:
    for scheme in ("http", "https"):
        status, body = call("GET", "/", signed=False, scheme=scheme)
        if status != 403 or b"<Error>" not in body:
            sys.exit(1)
    if mode == "full":
        bucket = "/outbox-relay-ready-probe"
        status, _ = call("PUT", bucket)
        # 409: made by an earlier attempt, whose later steps failed.
        if status not in (200, 409):
            sys.exit(1)
        if call("PUT", f"{bucket}/probe", b"ready")[0] != 200 or call("GET", f"{bucket}/probe") != (200, b"ready"):
            sys.exit(1)
        if call("DELETE", f"{bucket}/probe")[0] != 204 or call("DELETE", bucket)[0] != 204:
            sys.exit(1)
except (OSError, http.client.HTTPException):
    sys.exit(1)
PY
}

# The S3 identities (-s3.config): one admin identity, every action, the credentials from
# the environment; written at each start, so a restart takes new keys.
write_identities() {
  python3 - "$1" <<'PY'
import json, os, sys

actions = ["Admin", "Read", "ReadAcp", "Write", "WriteAcp", "List", "Tagging", "DeleteBucket"]
identity = {
    "name": "outbox-relay-admin",
    "credentials": [{"accessKey": os.environ["PROBE_ACCESS_KEY"], "secretKey": os.environ["PROBE_SECRET_KEY"]}],
    "actions": actions,
}
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as out:
    json.dump({"identities": [identity]}, out, indent=2)
PY
}

cmd_start() {
  local dir="$1" port="$2" pid
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  export PROBE_ACCESS_KEY="$ACCESS_KEY" PROBE_SECRET_KEY="$SECRET_KEY"
  local https_port internal=$((port + 2))
  https_port="$(s3_https_port "$port")"
  ((port + 9 < 65536)) || die "PORT must be below 65526: the store uses PORT..PORT+9"

  if pid="$(running_pid "$dir")"; then
    if probe_ready quick "$dir" "$port"; then
      log "seaweedfs already running in $dir (pid $pid), S3 on 127.0.0.1:$port"
      return 0
    fi
    die "a seaweedfs is running in $dir (pid $pid) but 127.0.0.1:$port does not answer; run '$0 stop $dir' first"
  fi
  # shellcheck disable=SC2046  # one port a word
  require_free_ports "$port" "$https_port" $(internal_ports "$port")
  build_server

  "$SERVICES_DIR/certs.sh" "$dir/certs"
  mkdir -p "$dir/data"
  write_identities "$dir/s3.json"
  # The key SSE-S3 (server_side_encryption: AES256) encrypts objects' keys with: made
  # once per DIR and kept, so a restarted store still reads what it wrote.
  [[ -s "$dir/sse_kek" ]] || (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$dir/sse_kek")

  log "starting seaweedfs $SEAWEEDFS_VERSION, S3 on 127.0.0.1:$port (HTTPS $https_port), dir $dir"
  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  # In DIR: weed reads master.toml, filer.toml and the like from its working directory
  # (and from -config_dir, DIR too) before ~/.seaweedfs and /etc/seaweedfs.
  cd "$dir"
  # One process: master, volume server, filer (its metadata in leveldb under DIR/data) and
  # S3 gateway, every listener on 127.0.0.1 only.
  #  - -master.peers=none: a single master that elects itself at once, and resumes its
  #    raft state on a restart.
  #  - Volumes of 64 MB (the least mini mode allows), at most 200 (sparse files, nothing
  #    is allocated before it is written). Each bucket is a collection of its own, and the
  #    master grows 7 volumes for a new one (master.volume_growth.copy_1); 1 is enough
  #    here (as `weed mini` does).
  #  - The volume server waits 10 s after SIGTERM (preStopSeconds, for its clients to
  #    move) before it stops: no clients to move here.
  #  - GOMEMLIMIT: a soft limit that makes Go's GC collect before the heap doubles; a
  #    restart (leveldb replay, volume index loads) otherwise leaves ~110 MB of heap
  #    where ~40 MB are live.
  #  - No telemetry (it reports to seaweedfs.com by default), no Iceberg or Lance catalog
  #    servers (on 8181 and 9101 by default), no anonymous S3 access: the identities file
  #    has the admin one only.
  pid="$(spawn "$dir/seaweedfs.pid" "$dir/seaweedfs.log" "$deadline" \
    env -u SENTRY_DSN WEED_MASTER_VOLUME_GROWTH_COPY_1=1 GOMEMLIMIT="$MEMORY_LIMIT" \
    WEED_S3_SSE_KEK="$(cat "$dir/sse_kek")" \
    "$SERVER" -logtostderr=true -v="${SEAWEEDFS_LOG_LEVEL:-0}" -config_dir="$dir" \
    server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/data" \
    -master.peers=none -master.port=$internal -master.port.grpc=$((internal + 1)) \
    -master.volumeSizeLimitMB=64 -master.telemetry=false \
    -volume.port=$((internal + 2)) -volume.port.grpc=$((internal + 3)) \
    -volume.max=200 -volume.preStopSeconds=0 \
    -filer -filer.port=$((internal + 4)) -filer.port.grpc=$((internal + 5)) \
    -s3 -s3.port="$port" -s3.port.https="$https_port" -s3.port.grpc=$((internal + 6)) \
    -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.cert.file="$dir/certs/server.crt" -s3.key.file="$dir/certs/server.key" \
    -s3.config="$dir/s3.json")"

  STARTING_DIR="$dir"
  wait_ready "$pid" "$deadline" 0.25 "seaweedfs process $pid exited during startup" \
    "seaweedfs did not take a bucket on 127.0.0.1:$port after ${START_TIMEOUT}s (killed pid $pid)" \
    probe_ready full "$dir" "$port" "$(($(date +%s) + START_TIMEOUT))"
  log "seaweedfs ready on 127.0.0.1:$port (HTTPS $https_port, pid $pid) after $((SECONDS - started))s"
}

STARTING_DIR=""
fail_start() {
  show_tail 40 "$STARTING_DIR/seaweedfs.log"
  die "$*"
}

cmd_stop() {
  local dir="$1" pid
  if ! pid="$(running_pid "$dir")"; then
    log "no seaweedfs running in $dir"
    rm -f "$dir/seaweedfs.pid"
    return 0
  fi
  log "stopping seaweedfs (pid $pid) in $dir"
  stop_pid "$pid" "$STOP_TIMEOUT"
  rm -f "$dir/seaweedfs.pid"
  log "seaweedfs stopped"
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
