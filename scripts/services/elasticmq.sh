#!/usr/bin/env bash
# Provision ElasticMQ, an SQS-compatible queue server (standard and FIFO queues), as a
# local java process -- no Docker needed, only Java 17+, Maven and python3.
#
#   elasticmq.sh fetch              resolve the server's jars into the cache (no-op if cached)
#   elasticmq.sh start DIR PORT     start a server whose SQS API is on 127.0.0.1:PORT (plain
#                                   HTTP: ElasticMQ speaks no TLS); queues are created through
#                                   the API; queues and messages persist in DIR, so a stopped
#                                   (or SIGKILLed) DIR starts again with both
#   elasticmq.sh stop DIR           stop the server started in DIR (its queues and messages stay)
#   elasticmq.sh status DIR         exit 0 if the server of DIR is running
#
# Environment:
#   OUTBOX_RELAY_CACHE        cache root (default: $HOME/.cache/outbox-relay)
#   ELASTICMQ_VERSION         override the version pinned in elasticmq/pom.xml
#   ELASTICMQ_HEAP_OPTS       JVM heap flags (default: -Xmx256m -Xms64m)
#   ELASTICMQ_START_TIMEOUT   seconds to wait for readiness (default: 60)
#   ELASTICMQ_STOP_TIMEOUT    seconds between SIGTERM and SIGKILL (default: 15)
#   JAVA_HOME                 Java to use (default: java on PATH)
#   MVN                       Maven executable (default: mvn)
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

POM="$SERVICES_DIR/elasticmq/pom.xml"
CACHE_ROOT="${OUTBOX_RELAY_CACHE:-$HOME/.cache/outbox-relay}"
START_TIMEOUT="${ELASTICMQ_START_TIMEOUT:-60}"
STOP_TIMEOUT="${ELASTICMQ_STOP_TIMEOUT:-15}"
HEAP_OPTS="${ELASTICMQ_HEAP_OPTS:--Xmx256m -Xms64m}"
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA="$JAVA_HOME/bin/java"
else
  JAVA="java"
fi

elasticmq_version() {
  if [[ -n "${ELASTICMQ_VERSION:-}" ]]; then
    printf '%s\n' "$ELASTICMQ_VERSION"
    return
  fi
  local v
  v="$(sed -n 's:.*<elasticmq.version>\(.*\)</elasticmq.version>.*:\1:p' "$POM" | head -n1)"
  [[ -n "$v" ]] || die "cannot read <elasticmq.version> from $POM"
  printf '%s\n' "$v"
}

libs_dir() { printf '%s/elasticmq-%s/libs\n' "$CACHE_ROOT" "$(elasticmq_version)"; }

# Cached once the server jar is there: the directory is only ever populated by the
# rename of a complete download.
is_cached() { [[ -f "$1/elasticmq-server_2.13-$2.jar" ]]; }

cmd_fetch() {
  local version libs base tmp start
  version="$(elasticmq_version)"
  libs="$(libs_dir)"
  if is_cached "$libs" "$version"; then
    log "ElasticMQ $version jars already cached in $libs"
    return 0
  fi
  command -v "${MVN:-mvn}" >/dev/null || die "maven ('${MVN:-mvn}') not found on PATH"
  base="$(dirname "$libs")"
  mkdir -p "$base"
  # Concurrent fetches (parallel test sessions) take turns.
  exec 9>"$base/.fetch.lock"
  flock 9
  if is_cached "$libs" "$version"; then
    log "ElasticMQ $version jars already cached in $libs"
    exec 9>&-
    return 0
  fi
  tmp="$(mktemp -d "$base/.libs.XXXXXX")"
  log "fetching ElasticMQ $version jars with maven into $libs ..."
  start=$SECONDS
  if ! "${MVN:-mvn}" -q -B -Dstyle.color=never -f "$POM" \
      -Delasticmq.version="$version" \
      dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" \
      >"$base/fetch.log" 2>&1; then
    rm -rf "$tmp"
    tail -n 40 "$base/fetch.log" >&2 || true
    exec 9>&-
    die "maven failed to resolve ElasticMQ $version (full log: $base/fetch.log)"
  fi
  is_cached "$tmp" "$version" || { rm -rf "$tmp"; exec 9>&-; die "maven did not produce elasticmq-server_2.13-$version.jar"; }
  rm -rf "$libs"
  mv "$tmp" "$libs"
  exec 9>&-
  log "fetched $(find "$libs" -name '*.jar' | wc -l) jars in $((SECONDS - start))s"
}

# pid of the server of DIR if it is alive and really ours (its command line names
# DIR's config file), else fail.
running_pid() { pid_from_file "$1/elasticmq.pid" "$1/elasticmq.conf"; }

# Print the number of queues 127.0.0.1:PORT lists (ListQueues, the SQS JSON protocol,
# unsigned: ElasticMQ checks no signature); fail if it does not answer.
queue_count() {
  python3 - "$1" <<'PY'
import json, sys, urllib.request
request = urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[1]}/",
    data=b"{}",
    headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS.ListQueues"},
)
try:
    with urllib.request.urlopen(request, timeout=3) as answer:
        print(len(json.load(answer).get("QueueUrls", [])))
except Exception:
    sys.exit(1)
PY
}

# Exit 0 once 127.0.0.1:PORT answers ListQueues with at least as many queues as DIR
# held when it was last stopped (DIR/queues.count): ElasticMQ restores its queues from
# its database just after it starts listening, and a client in that window would be
# told its queue does not exist.
probe_ready() {
  local port="$1" dir="$2" count expected=0
  count="$(queue_count "$port")" || return 1
  [[ -f "$dir/queues.count" ]] && expected="$(cat "$dir/queues.count")"
  ((count >= expected))
}

write_config() {
  local dir="$1" port="$2"
  # messages-storage: queues and messages in an H2 database in DIR (DIR/data), restored
  # at start (queues-storage, a file of queue definitions, is set too; ElasticMQ 1.7.1
  # keeps the queues in the database when both are on). So a restart (the outage tests)
  # finds its queues and the messages they held, as SQS would. DB_CLOSE_ON_EXIT=FALSE:
  # by default H2 closes the database in the JVM's shutdown hook while ElasticMQ still
  # answers, and a batch acked in that window was lost (tried: 10 of 970 acked messages
  # gone after a stop); WRITE_DELAY=0: each write reaches the file before the ack, so a
  # SIGKILL loses nothing acked either (tried: 0 of 2,200).
  cat >"$dir/elasticmq.conf" <<EOF
# Generated by scripts/services/elasticmq.sh
include classpath("application.conf")

# Queue URLs name the host and port the request came to.
node-address {
  protocol = http
  host = "*"
  port = $port
  context-path = ""
}

rest-sqs {
  enabled = true
  bind-port = $port
  bind-hostname = "127.0.0.1"
  sqs-limits = strict
}

generate-node-address = false

queues-storage {
  enabled = true
  path = "$dir/queues.conf"
}

messages-storage {
  enabled = true
  uri = "jdbc:h2:$dir/data/messages;DB_CLOSE_ON_EXIT=FALSE;WRITE_DELAY=0"
}

aws {
  region = us-east-1
  accountId = "000000000000"
}
EOF
  cat >"$dir/logback.xml" <<EOF
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$dir/elasticmq.log</file>
    <encoder><pattern>%d{ISO8601} %-5level %logger{36} - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
EOF
}

cmd_start() {
  local dir="$1" port="$2" pid libs version
  mkdir -p "$dir/data"
  dir="$(cd "$dir" && pwd)"
  if pid="$(running_pid "$dir")"; then
    if probe_ready "$port" "$dir"; then
      log "ElasticMQ already running in $dir (pid $pid) on 127.0.0.1:$port"
      return 0
    fi
    die "ElasticMQ is running in $dir (pid $pid) but 127.0.0.1:$port does not answer; run '$0 stop $dir' first"
  fi
  require_free_ports "$port"
  cmd_fetch
  version="$(elasticmq_version)"
  libs="$(libs_dir)"
  write_config "$dir" "$port"
  log "starting ElasticMQ $version on 127.0.0.1:$port, dir $dir"
  local deadline=$((SECONDS + START_TIMEOUT)) started=$SECONDS
  # C1 only and the serial collector: a small test server starts and restarts with
  # little CPU on a shared 2-core machine.
  # shellcheck disable=SC2086  # the heap options are word-split on purpose
  pid="$(spawn "$dir/elasticmq.pid" "$dir/elasticmq.out" "$deadline" \
    "$JAVA" $HEAP_OPTS -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dconfig.file="$dir/elasticmq.conf" -Dlogback.configurationFile="$dir/logback.xml" \
    -cp "$libs/*" org.elasticmq.server.Main)"
  STARTING_DIR="$dir"
  wait_ready "$pid" "$deadline" 0.25 "ElasticMQ process $pid exited during startup" \
    "ElasticMQ not ready on 127.0.0.1:$port after ${START_TIMEOUT}s (killed pid $pid)" \
    probe_ready "$port" "$dir"
  log "ElasticMQ ready on 127.0.0.1:$port (pid $pid) after $((SECONDS - started))s"
}

# Called by wait_ready; STARTING_DIR is the DIR being started.
fail_start() {
  show_tail 20 "$STARTING_DIR/elasticmq.out"
  show_tail 40 "$STARTING_DIR/elasticmq.log"
  die "$*"
}

cmd_stop() {
  local dir="$1" pid
  if ! pid="$(running_pid "$dir")"; then
    log "no ElasticMQ running in $dir"
    rm -f "$dir/elasticmq.pid"
    return 0
  fi
  # What the next start waits to see restored (a SIGKILL leaves the last count).
  local port count
  port="$(sed -n 's/^  bind-port = //p' "$dir/elasticmq.conf")"
  if count="$(queue_count "$port")"; then
    printf '%s\n' "$count" >"$dir/queues.count"
  fi
  log "stopping ElasticMQ (pid $pid) in $dir"
  stop_pid "$pid" "$STOP_TIMEOUT"
  rm -f "$dir/elasticmq.pid"
  log "ElasticMQ stopped"
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
