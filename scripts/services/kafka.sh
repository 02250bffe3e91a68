#!/usr/bin/env bash
# Provision a real, single-node Apache Kafka broker (KRaft mode) as a local
# process -- no Docker needed, only Java 17+, Maven and python3.
#
#   kafka.sh fetch              resolve the broker jars into the cache (no-op if cached)
#   kafka.sh start DIR PORT     format + start a broker on 127.0.0.1:PORT (controller on PORT+1,
#                               and a SASL_SSL listener on PORT+2: SCRAM-SHA-512 user
#                               $KAFKA_SCRAM_USER, TLS with DIR/tls/ca.pem as its CA)
#   kafka.sh stop DIR           stop the broker started in DIR
#   kafka.sh status DIR         exit 0 if the broker of DIR is running
#
# Environment:
#   OUTBOX_RELAY_CACHE   cache root (default: $HOME/.cache/outbox-relay)
#   KAFKA_VERSION        override the Kafka version pinned in kafka/pom.xml
#   KAFKA_HEAP_OPTS      JVM heap flags (default: -Xmx512m -Xms256m)
#   KAFKA_START_TIMEOUT  seconds to wait for readiness (default: 90)
#   KAFKA_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL (default: 20)
#   JAVA_HOME            Java to use (default: java on PATH)
#   KAFKA_SCRAM_USER     the SASL_SSL listener's user (default: relay)
#   KAFKA_SCRAM_PASSWORD its password, created at format time (default: relay-test-secret)
#   MVN                  Maven executable (default: mvn)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

POM="$SERVICES_DIR/kafka/pom.xml"
CACHE_ROOT="${OUTBOX_RELAY_CACHE:-$HOME/.cache/outbox-relay}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-20}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
SCRAM_USER="${KAFKA_SCRAM_USER:-relay}"
SCRAM_PASSWORD="${KAFKA_SCRAM_PASSWORD:-relay-test-secret}"
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA="$JAVA_HOME/bin/java"
else
  JAVA="java"
fi

kafka_version() {
  if [[ -n "${KAFKA_VERSION:-}" ]]; then
    printf '%s\n' "$KAFKA_VERSION"
    return
  fi
  local v
  v="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
  [[ -n "$v" ]] || die "cannot read <kafka.version> from $POM"
  printf '%s\n' "$v"
}

libs_dir() { printf '%s/kafka-%s/libs\n' "$CACHE_ROOT" "$(kafka_version)"; }

# Directory is considered cached once the broker jar is in it (it is only
# ever populated by an atomic rename of a complete download).
is_cached() {
  local libs="$1" version="$2"
  [[ -f "$libs/kafka_2.13-$version.jar" ]]
}

cmd_fetch() {
  local version libs base lock tmp
  version="$(kafka_version)"
  libs="$(libs_dir)"
  if is_cached "$libs" "$version"; then
    log "Kafka $version jars already cached in $libs"
    return 0
  fi
  command -v "${MVN:-mvn}" >/dev/null || die "maven ('${MVN:-mvn}') not found on PATH"
  base="$(dirname "$libs")"
  mkdir -p "$base"
  lock="$base/.fetch.lock"
  # Serialize concurrent fetches (e.g. parallel test workers).
  exec 9>"$lock"
  flock 9
  if is_cached "$libs" "$version"; then
    log "Kafka $version jars already cached in $libs"
    exec 9>&-
    return 0
  fi
  tmp="$(mktemp -d "$base/.libs.XXXXXX")"
  log "fetching Kafka $version jars with maven into $libs ..."
  local start=$SECONDS
  if ! "${MVN:-mvn}" -q -B -Dstyle.color=never -f "$POM" \
      -Dkafka.version="$version" \
      dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" \
      >"$base/fetch.log" 2>&1; then
    rm -rf "$tmp"
    tail -n 40 "$base/fetch.log" >&2 || true
    exec 9>&-
    die "maven failed to resolve Kafka $version (full log: $base/fetch.log)"
  fi
  is_cached "$tmp" "$version" || { rm -rf "$tmp"; exec 9>&-; die "maven did not produce kafka_2.13-$version.jar"; }
  rm -rf "$libs"
  mv "$tmp" "$libs"
  exec 9>&-
  log "fetched $(find "$libs" -name '*.jar' | wc -l) jars in $((SECONDS - start))s"
}

# pid of the broker of DIR if it is alive (and really is our java: its command
# line names DIR's config file), else fail.
running_pid() {
  pid_from_file "$1/kafka.pid" "$1/server.properties"
}

# Exit 0 once 127.0.0.1:PORT answers a Kafka Metadata (v4) request listing at
# least one broker and a controller, i.e. the node is really serving.
probe_ready() {
  python3 - "$1" <<'PY'
import socket, struct, sys
port = int(sys.argv[1])
def kstr(s):
    b = s.encode()
    return struct.pack(">h", len(b)) + b
try:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.settimeout(5)
        # Request header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id
        # Body v4: topics=null (-1), allow_auto_topic_creation=false
        body = struct.pack(">hhi", 3, 4, 42) + kstr("outbox-relay-probe") + struct.pack(">ib", -1, 0)
        s.sendall(struct.pack(">i", len(body)) + body)
        def recv(n):
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf
        (size,) = struct.unpack(">i", recv(4))
        data = recv(size)
except (OSError, EOFError):
    sys.exit(1)
corr, _throttle, nbrokers = struct.unpack_from(">iii", data, 0)
if corr != 42 or nbrokers < 1:
    sys.exit(1)
off = 12
for _ in range(nbrokers):
    off += 4                                          # node_id
    (hl,) = struct.unpack_from(">h", data, off); off += 2 + hl   # host
    off += 4                                          # port
    (rl,) = struct.unpack_from(">h", data, off); off += 2 + max(rl, 0)  # rack
(cl,) = struct.unpack_from(">h", data, off); off += 2 + max(cl, 0)      # cluster_id
(controller,) = struct.unpack_from(">i", data, off)
sys.exit(0 if controller >= 0 else 1)
PY
}

write_config() {
  local dir="$1" port="$2" cport="$3" sport="$4"
  cat >"$dir/server.properties" <<EOF
# Generated by scripts/services/kafka.sh -- single-node KRaft broker for tests.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,SASL_SSL://127.0.0.1:$sport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,SASL_SSL://127.0.0.1:$sport
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$dir/tls/server.pem
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$dir/data
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
log.segment.bytes=16777216
EOF
  cat >"$dir/log4j2.properties" <<EOF
# Generated by scripts/services/kafka.sh
status = warn
name = outbox-relay-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $dir/kafka.log
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
logger.requests.name = kafka.request.logger
logger.requests.level = WARN
EOF
  # For one-shot tools (storage format): warnings to stdout only.
  cat >"$dir/log4j2-tools.properties" <<EOF
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
EOF
}

cmd_start() {
  local dir="$1" port="$2" cport sport pid libs version
  cport=$((port + 1))
  sport=$((port + 2))
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"

  if pid="$(running_pid "$dir")"; then
    if probe_ready "$port"; then
      log "broker already running in $dir (pid $pid) on 127.0.0.1:$port"
      return 0
    fi
    die "a broker is running in $dir (pid $pid) but 127.0.0.1:$port is not ready; run '$0 stop $dir' first"
  fi
  require_free_ports "$port" "$cport" "$sport"

  cmd_fetch
  version="$(kafka_version)"
  libs="$(libs_dir)"

  # The KRaft voter set written at format time records the controller
  # endpoint, so a formatted DIR can only be restarted on the same PORT.
  if [[ -f "$dir/data/meta.properties" && -f "$dir/port" && "$(cat "$dir/port")" != "$port" ]]; then
    die "$dir was formatted for port $(cat "$dir/port"), not $port; use a clean DIR"
  fi
  make_certs "$dir"
  write_config "$dir" "$port" "$cport" "$sport"
  printf '%s\n' "$port" >"$dir/port"
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    local cluster_id
    # A Kafka Uuid: 16 random bytes, url-safe base64 without padding.
    # A leading '-' would be read as an option by StorageTool: draw again until it is not.
    cluster_id="$(python3 -c 'import base64,uuid
while True:
    c = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not c.startswith("-"):
        print(c)
        break')"
    printf '%s\n' "$cluster_id" >"$dir/cluster.id"
    log "formatting KRaft storage in $dir/data (cluster id $cluster_id)"
    if ! "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$dir/log4j2-tools.properties" \
        -cp "$libs/*" kafka.tools.StorageTool format --standalone \
        -t "$cluster_id" -c "$dir/server.properties" \
        --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" >"$dir/format.log" 2>&1; then
      cat "$dir/format.log" >&2
      die "kafka storage format failed"
    fi
  fi

  log "starting Kafka $version on 127.0.0.1:$port (controller 127.0.0.1:$cport), dir $dir"
  rm -f "$dir/kafka.pid"
  # The inner shell records its own pid, then execs java (same pid), in a new
  # session so signals aimed at the caller's process group do not reach it.
  # shellcheck disable=SC2016,SC2086  # $$ is for the inner shell; HEAP_OPTS is word-split on purpose
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/kafka.pid" \
    "$JAVA" $HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -Dkafka.logs.dir="$dir" \
    -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >"$dir/kafka.out" 2>&1 &
  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  while [[ ! -s "$dir/kafka.pid" ]]; do
    ((SECONDS < deadline)) || die "broker process did not start"
    sleep 0.05
  done
  pid="$(cat "$dir/kafka.pid")"

  STARTING_DIR="$dir"
  wait_ready "$pid" "$deadline" 0.25 "broker process $pid exited during startup" \
    "broker not ready on 127.0.0.1:$port after ${START_TIMEOUT}s (killed pid $pid)" \
    probe_ready "$port"
  log "Kafka ready on 127.0.0.1:$port (pid $pid) after $((SECONDS - started))s"
}

# Called by wait_ready; STARTING_DIR is the DIR being started.
fail_start() {
  show_tail 20 "$STARTING_DIR/kafka.out"
  show_tail 60 "$STARTING_DIR/kafka.log"
  die "$*"
}

cmd_stop() {
  local dir="$1" pid
  if ! pid="$(running_pid "$dir")"; then
    log "no broker running in $dir"
    rm -f "$dir/kafka.pid"
    return 0
  fi
  log "stopping Kafka (pid $pid) in $dir"
  stop_pid "$pid" "$STOP_TIMEOUT"
  rm -f "$dir/kafka.pid"
  log "Kafka stopped"
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

service_main fetch "$@"
