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
# A 3-node cluster (KRaft, each node broker+controller, the 3 a static voter set):
#   kafka.sh cluster-start DIR PORT   format + start nodes 1-3 in DIR/node1..3; node N listens
#                               on PORT+3(N-1) (PLAINTEXT), +1 (CONTROLLER), +2 (SASL_SSL);
#                               returns once every node's metadata lists all 3 brokers
#   kafka.sh cluster-stop DIR   stop the 3 nodes of DIR (together)
#   kafka.sh cluster-status DIR exit 0 if all 3 nodes of DIR are running
# A node of a cluster is stopped and started again alone with `stop DIR/nodeN` and
# `start DIR/nodeN PORT+3(N-1)`: it comes back on its ports with its data, and `start`
# returns once it is registered again (listed in its own metadata).
#
# Environment:
#   OUTBOX_RELAY_CACHE   cache root (default: $HOME/.cache/outbox-relay)
#   KAFKA_VERSION        override the Kafka version pinned in kafka/pom.xml
#   KAFKA_HEAP_OPTS      JVM heap flags (default: -Xmx512m -Xms256m)
#   KAFKA_CLUSTER_HEAP_OPTS  a cluster node's heap flags (default: -Xmx384m -Xms128m)
#   KAFKA_CLUSTER_JVM_OPTS   a cluster node's other JVM flags (default: -XX:TieredStopAtLevel=1)
#   KAFKA_START_TIMEOUT  seconds to wait for readiness (default: 90)
#   KAFKA_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL (default: 20)
#   JAVA_HOME            Java to use (default: java on PATH)
#   KAFKA_SCRAM_USER     the SASL_SSL listener's user (default: relay)
#   KAFKA_SCRAM_PASSWORD its password, created at format time (default: relay-test-secret)
#   KAFKA_PROXY_PORT     single node: a 4th listener on PORT+3 that advertises this port, a
#                        proxy's in front of it (toxiproxy; see write_config)
#   MVN                  Maven executable (default: mvn)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

POM="$SERVICES_DIR/kafka/pom.xml"
CACHE_ROOT="${OUTBOX_RELAY_CACHE:-$HOME/.cache/outbox-relay}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-20}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
CLUSTER_HEAP_OPTS="${KAFKA_CLUSTER_HEAP_OPTS:--Xmx384m -Xms128m}"
# C1 only: a node (re)starts in a fraction of the CPU the C2 compiler would take, and
# the cluster scenarios restart nodes on a 2-core machine; a test cluster needs no peak speed.
CLUSTER_JVM_OPTS="${KAFKA_CLUSTER_JVM_OPTS:--XX:TieredStopAtLevel=1}"
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
# least MIN-BROKERS brokers (default 1), NODE-ID among them if given, and a
# controller, i.e. the node is really serving (a KRaft broker lists only the
# brokers the controller has unfenced, itself only once it is registered).
#   probe_ready PORT [MIN-BROKERS [NODE-ID]]
probe_ready() {
  python3 - "$1" "${2:-1}" "${3:--1}" <<'PY'
import socket, struct, sys
port, min_brokers, node_id = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
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
if corr != 42 or nbrokers < min_brokers:
    sys.exit(1)
off = 12
nodes = set()
for _ in range(nbrokers):
    nodes.add(struct.unpack_from(">i", data, off)[0]); off += 4   # node_id
    (hl,) = struct.unpack_from(">h", data, off); off += 2 + hl   # host
    off += 4                                          # port
    (rl,) = struct.unpack_from(">h", data, off); off += 2 + max(rl, 0)  # rack
(cl,) = struct.unpack_from(">h", data, off); off += 2 + max(cl, 0)      # cluster_id
(controller,) = struct.unpack_from(">i", data, off)
sys.exit(0 if controller >= 0 and (node_id < 0 or node_id in nodes) else 1)
PY
}

# A node of a cluster (cluster-start wrote DIR/cluster.env): its id, the voters and
# the cluster id, in NODE_ID, VOTERS and CLUSTER_ID; fails for a single-node DIR.
read_cluster_env() {
  local file="$1/cluster.env"
  [[ -f "$file" ]] || return 1
  NODE_ID="$(sed -n 's/^node_id=//p' "$file")"
  VOTERS="$(sed -n 's/^voters=//p' "$file")"
  CLUSTER_ID="$(sed -n 's/^cluster_id=//p' "$file")"
  [[ "$NODE_ID" =~ ^[1-9]$ && -n "$VOTERS" && -n "$CLUSTER_ID" ]] || die "$file is not a cluster node's"
}

# The node-specific lines of server.properties. A single node is its own quorum
# (formatted --standalone), with replication factor 1. A cluster node is one of 3
# static voters; topics get 3 replicas and need 2 in sync to ack (acks=all), and a
# dead broker is fenced and dropped from the ISRs within seconds, not half a minute.
node_config() {
  local cport="$1"
  if [[ -n "${NODE_ID:-}" ]]; then
    cat <<EOF
# Node $NODE_ID of a 3-node KRaft cluster (kafka.sh cluster-start).
node.id=$NODE_ID
controller.quorum.voters=$VOTERS
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
broker.session.timeout.ms=6000
broker.heartbeat.interval.ms=1000
replica.lag.time.max.ms=10000
EOF
  else
    cat <<EOF
# Single-node KRaft broker for tests.
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
EOF
  fi
}

write_config() {
  local dir="$1" port="$2" cport="$3" sport="$4"
  # KAFKA_PROXY_PORT: a fourth listener, PROXIED (plaintext), on PORT+3, whose metadata
  # names 127.0.0.1:KAFKA_PROXY_PORT, a proxy (toxiproxy) forwarding to PORT+3: a client
  # bootstrapped through the proxy stays behind it, the other listeners are untouched.
  local proxied="" proxied_advertised="" proxied_map=""
  if [[ -n "${KAFKA_PROXY_PORT:-}" ]]; then
    [[ "$KAFKA_PROXY_PORT" =~ ^[0-9]+$ ]] || die "KAFKA_PROXY_PORT must be a number, got '$KAFKA_PROXY_PORT'"
    proxied=",PROXIED://127.0.0.1:$((port + 3))"
    proxied_advertised=",PROXIED://127.0.0.1:$KAFKA_PROXY_PORT"
    proxied_map=",PROXIED:PLAINTEXT"
  fi
  {
    echo "# Generated by scripts/services/kafka.sh"
    node_config "$cport"
    cat <<EOF
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,SASL_SSL://127.0.0.1:$sport$proxied
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,SASL_SSL://127.0.0.1:$sport$proxied_advertised
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL$proxied_map
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$dir/tls/server.pem
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$dir/data
num.partitions=3
auto.create.topics.enable=true
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3
group.initial.rebalance.delay.ms=0
log.retention.hours=24
log.segment.bytes=16777216
EOF
  } >"$dir/server.properties"
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
  # A cluster node is ready once it is registered (listed by itself); a single node
  # once it lists any broker.
  local ready=("$port") heap="$HEAP_OPTS" format_mode=(--standalone)
  NODE_ID=""
  if read_cluster_env "$dir"; then
    ready=("$port" 1 "$NODE_ID")
    heap="$CLUSTER_HEAP_OPTS $CLUSTER_JVM_OPTS"
    format_mode=()  # the static voter set of the config
  fi

  if pid="$(running_pid "$dir")"; then
    if probe_ready "${ready[@]}"; then
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
    local cluster_id="${CLUSTER_ID:-}"
    [[ -n "$NODE_ID" ]] || cluster_id="$(new_cluster_id)"
    printf '%s\n' "$cluster_id" >"$dir/cluster.id"
    log "formatting KRaft storage in $dir/data (cluster id $cluster_id)"
    if ! "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$dir/log4j2-tools.properties" \
        -cp "$libs/*" kafka.tools.StorageTool format "${format_mode[@]}" \
        -t "$cluster_id" -c "$dir/server.properties" \
        --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" >"$dir/format.log" 2>&1; then
      cat "$dir/format.log" >&2
      die "kafka storage format failed"
    fi
  fi

  log "starting Kafka $version on 127.0.0.1:$port (controller 127.0.0.1:$cport), dir $dir"
  rm -f "$dir/kafka.pid"
  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  # shellcheck disable=SC2086  # the heap options are word-split on purpose
  pid="$(spawn "$dir/kafka.pid" "$dir/kafka.out" "$deadline" \
    "$JAVA" $heap -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -Dkafka.logs.dir="$dir" \
    -cp "$libs/*" kafka.Kafka "$dir/server.properties")"

  STARTING_DIR="$dir"
  wait_ready "$pid" "$deadline" 0.25 "broker process $pid exited during startup" \
    "broker not ready on 127.0.0.1:$port after ${START_TIMEOUT}s (killed pid $pid)" \
    probe_ready "${ready[@]}"
  log "Kafka ready on 127.0.0.1:$port (pid $pid) after $((SECONDS - started))s"
}

# A Kafka Uuid: 16 random bytes, url-safe base64 without padding. A leading '-'
# would be read as an option by StorageTool: draw again until it is not.
new_cluster_id() {
  python3 -c 'import base64,uuid
while True:
    c = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not c.startswith("-"):
        print(c)
        break'
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

CLUSTER_NODES=(1 2 3)

# Node N's PLAINTEXT port in a cluster on base PORT (its controller is +1, SASL_SSL +2).
node_port() { printf '%s\n' $(($1 + 3 * ($2 - 1))); }

cmd_cluster_start() {
  local dir="$1" port="$2" n voters="" cluster_id pids=() failed=0 deadline
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [[ -f "$dir/port" && "$(cat "$dir/port")" != "$port" ]]; then
    die "$dir was formatted for port $(cat "$dir/port"), not $port; use a clean DIR"
  fi
  cmd_fetch  # once, before the nodes start in parallel
  for n in "${CLUSTER_NODES[@]}"; do
    voters+="${voters:+,}$n@127.0.0.1:$(($(node_port "$port" "$n") + 1))"
  done
  if [[ ! -f "$dir/cluster.id" ]]; then
    new_cluster_id >"$dir/cluster.id"
  fi
  cluster_id="$(cat "$dir/cluster.id")"
  printf '%s\n' "$port" >"$dir/port"
  for n in "${CLUSTER_NODES[@]}"; do
    mkdir -p "$dir/node$n"
    printf 'node_id=%s\nvoters=%s\ncluster_id=%s\n' "$n" "$voters" "$cluster_id" >"$dir/node$n/cluster.env"
  done
  log "starting a 3-node Kafka cluster in $dir on 127.0.0.1:$port-$((port + 8))"
  # Together: a node is ready only once 2 of the 3 voters elected a controller.
  for n in "${CLUSTER_NODES[@]}"; do
    (cmd_start "$dir/node$n" "$(node_port "$port" "$n")") &
    pids+=("$!")
  done
  for n in "${pids[@]}"; do
    wait "$n" || failed=1
  done
  if ((failed)); then
    cmd_cluster_stop "$dir"
    die "the cluster in $dir did not start"
  fi
  # Ready: every node's metadata lists all 3 brokers (each registered and unfenced).
  deadline=$((SECONDS + START_TIMEOUT))
  for n in "${CLUSTER_NODES[@]}"; do
    until probe_ready "$(node_port "$port" "$n")" 3; do
      if ((SECONDS >= deadline)); then
        cmd_cluster_stop "$dir"
        die "node $n of $dir does not list 3 brokers after ${START_TIMEOUT}s"
      fi
      sleep 0.25
    done
  done
  log "Kafka cluster ready: bootstrap $(cluster_bootstrap "$port")"
}

cluster_bootstrap() {
  local n out=""
  for n in "${CLUSTER_NODES[@]}"; do
    out+="${out:+,}127.0.0.1:$(node_port "$1" "$n")"
  done
  printf '%s\n' "$out"
}

cmd_cluster_stop() {
  local dir="$1" n pids=() failed=0
  for n in "${CLUSTER_NODES[@]}"; do
    if [[ -d "$dir/node$n" ]]; then
      (cmd_stop "$dir/node$n") &
      pids+=("$!")
    fi
  done
  for n in "${pids[@]}"; do
    wait "$n" || failed=1
  done
  ((failed == 0)) || die "a node of $dir did not stop"
}

cmd_cluster_status() {
  local dir="$1" n pid down=0
  for n in "${CLUSTER_NODES[@]}"; do
    if pid="$(running_pid "$dir/node$n")"; then
      log "node $n running (pid $pid)"
    else
      log "node $n not running"
      down=1
    fi
  done
  return "$down"
}

# The cluster commands, beside the single-node ones of service_main (lib.sh).
case "${1:-}" in
  cluster-start)
    [[ $# -eq 3 ]] || usage
    [[ "$3" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$3'"
    cmd_cluster_start "$2" "$3"
    exit ;;
  cluster-stop | cluster-status)
    [[ $# -eq 2 ]] || usage
    if [[ ! -d "$2" ]]; then
      log "nothing there: $2 does not exist"
      [[ "$1" == cluster-stop ]]
      exit
    fi
    "cmd_${1//-/_}" "$(cd "$2" && pwd)"
    exit ;;
esac

service_main fetch "$@"
