#!/usr/bin/env bash
# A real Apache Kafka broker (single node, KRaft, broker+controller in one JVM) on loopback,
# without Docker: jars from Maven Central (deploy/local/kafka/pom.xml), run with the machine's Java.
#
#   deploy/local/kafka.sh start|stop|restart|status|reset|bootstrap|version
#
# start   resolve the jars (cached), format storage if needed, start, wait until ready;
#         reuses a broker already accepting connections on the port (exit 0).
# stop    SIGTERM (controlled shutdown), wait, SIGKILL after NBV_KAFKA_STOP_TIMEOUT seconds.
# status  exit 0 when the port accepts connections, 3 otherwise.
# reset   stop, then wipe the data dir and cluster id (next start formats a fresh cluster).
#
# Env: NBV_KAFKA_VERSION (default below), NBV_KAFKA_PORT (9092), NBV_KAFKA_CONTROLLER_PORT (9093),
#      NBV_STATE_DIR (<repo>/.nbv), NBV_CACHE_DIR ($HOME/.cache/nbv), NBV_KAFKA_HEAP (512m),
#      NBV_KAFKA_START_TIMEOUT (120), NBV_KAFKA_STOP_TIMEOUT (60), NBV_KAFKA_GC_OPTS (G1, below),
#      NBV_MAVEN_REPO_LOCAL (Maven local repo; default: Maven's own, ~/.m2/repository),
#      MAVEN_ARGS (extra mvn args).
set -euo pipefail

# The one place the Kafka version is pinned (aiokafka 0.14.0 verified against it).
KAFKA_VERSION_DEFAULT=4.1.1

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
KAFKA_CONF_DIR="$SCRIPT_DIR/kafka"

KAFKA_VERSION="${NBV_KAFKA_VERSION:-$KAFKA_VERSION_DEFAULT}"
PORT="${NBV_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${NBV_KAFKA_CONTROLLER_PORT:-9093}"
STATE_DIR="${NBV_STATE_DIR:-$REPO_ROOT/.nbv}"
CACHE_ROOT="${NBV_CACHE_DIR:-${HOME:-/root}/.cache/nbv}"
HEAP="${NBV_KAFKA_HEAP:-512m}"
START_TIMEOUT="${NBV_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${NBV_KAFKA_STOP_TIMEOUT:-60}"

KDIR="$STATE_DIR/kafka"
DATA_DIR="$KDIR/data"
PID_FILE="$KDIR/kafka.pid"
LOG_FILE="$KDIR/kafka.log"
CONFIG_FILE="$KDIR/server.properties"
CLUSTER_ID_FILE="$KDIR/cluster.id"
FORMAT_VERSION_FILE="$KDIR/formatted.version"
CACHE_DIR="$CACHE_ROOT/kafka-$KAFKA_VERSION"
LIBS_DIR="$CACHE_DIR/libs"
MARKER="$CACHE_DIR/.complete"

log() { printf '[nbv-infra] kafka: %s\n' "$*" >&2; }
die() { printf '[nbv-infra] kafka: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
  log "installing $* with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The logging binding and config depend on the major version (see kafka/pom.xml).
case "$KAFKA_VERSION" in
  3.*) LEGACY_LOGGING=1 ;;
  4.*) LEGACY_LOGGING=0 ;;
  *) die "unsupported NBV_KAFKA_VERSION=$KAFKA_VERSION (3.9.x or 4.x)" ;;
esac

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A real Kafka answer: send ApiVersions v0 (api key 18, correlation id 1, null client id) and
# expect a response carrying correlation id 1. Needs no client library.
kafka_answers() {
  local reply
  # shellcheck disable=SC2016  # $1 expands in the inner bash
  reply="$(timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "\x00\x00\x00\x0a\x00\x12\x00\x00\x00\x00\x00\x01\xff\xff" >&3
    head -c 8 <&3 | od -An -tx1' _ "$1" 2>/dev/null | tr -d ' \n')" || return 1
  [ "${#reply}" -eq 16 ] && [ "${reply:8:8}" = "00000001" ]
}

# Pid of *our* broker: from the pid file, checked against /proc so a recycled pid is ignored.
our_pid() {
  local pid
  [ -f "$PID_FILE" ] || return 1
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "kafka.Kafka $CONFIG_FILE" || return 1
  printf '%s\n' "$pid"
}

log_tail() {
  if [ -f "$LOG_FILE" ]; then
    printf '[nbv-infra] kafka: ---- last 40 lines of %s ----\n' "$LOG_FILE" >&2
    tail -n 40 "$LOG_FILE" >&2 || true
    printf '[nbv-infra] kafka: ----\n' >&2
  fi
}

ensure_tools() {
  command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null 2>&1 || apt_install maven
}

pom_hash() {
  sha256sum <"$KAFKA_CONF_DIR/pom.xml" | cut -c1-16
}

# Jars: resolved once per version into the cache; the marker records the pom they came from.
ensure_libs() {
  local want tmp
  want="$KAFKA_VERSION $(pom_hash)"
  if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$want" ] && [ -d "$LIBS_DIR" ]; then
    return 0
  fi
  ensure_tools
  log "resolving kafka_2.13:$KAFKA_VERSION jars with Maven into $LIBS_DIR"
  mkdir -p "$CACHE_DIR"
  tmp="$(mktemp -d "$CACHE_DIR/libs.tmp.XXXXXX")"
  local -a mvn_args=(-B -q -Dstyle.color=never -f "$KAFKA_CONF_DIR/pom.xml" "-Dkafka.version=$KAFKA_VERSION")
  if [ -n "${NBV_MAVEN_REPO_LOCAL:-}" ]; then mvn_args+=("-Dmaven.repo.local=$NBV_MAVEN_REPO_LOCAL"); fi
  if [ "$LEGACY_LOGGING" = 1 ]; then mvn_args+=(-Dnbv.legacyLogging=true); fi
  # shellcheck disable=SC2086  # MAVEN_ARGS is a user-supplied word list
  if ! (cd "$KAFKA_CONF_DIR" && mvn "${mvn_args[@]}" ${MAVEN_ARGS:-} \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
        -DincludeScope=runtime "-DoutputDirectory=$tmp" >"$CACHE_DIR/mvn.log" 2>&1); then
    tail -n 40 "$CACHE_DIR/mvn.log" >&2 || true
    rm -rf "$tmp"
    die "Maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $CACHE_DIR/mvn.log)"
  fi
  [ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ] || { rm -rf "$tmp"; die "kafka_2.13-$KAFKA_VERSION.jar missing after Maven"; }
  rm -rf "$LIBS_DIR"
  mv "$tmp" "$LIBS_DIR"
  printf '%s\n' "$want" >"$MARKER"
  log "cached $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars"
}

if [ "$LEGACY_LOGGING" = 1 ]; then
  LOG_OPT="-Dlog4j.configuration=file:$KAFKA_CONF_DIR/log4j.properties"
else
  LOG_OPT="-Dlog4j2.configurationFile=$KAFKA_CONF_DIR/log4j2.properties"
fi
# Kafka's own collector settings (kafka-run-class.sh): G1 with a 20 ms pause goal. SerialGC's
# young collections stop the broker for 50-100 ms here, and every produce waiting on an ack
# (a decision's answer waits for one) waits that long: most of the decision bench's p99.
read -r -a GC_OPTS <<<"${NBV_KAFKA_GC_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent}"
JAVA_OPTS=(-Xms"$HEAP" -Xmx"$HEAP" "${GC_OPTS[@]}" -Djava.awt.headless=true "$LOG_OPT")

storage_tool() {
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 "$LOG_OPT" \
    -cp "$LIBS_DIR/*" kafka.tools.StorageTool "$@"
}

# A Kafka Uuid as StorageTool random-uuid makes it: 16 random bytes, URL-safe base64 without
# padding, never starting with '-'.
new_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [ "${id:0:1}" != "-" ] && [ "${#id}" -eq 22 ] && break
  done
  printf '%s\n' "$id"
}

write_config() {
  sed -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" -e "s|@LOG_DIRS@|$DATA_DIR|g" \
    "$KAFKA_CONF_DIR/server.properties.tmpl" >"$CONFIG_FILE"
}

# Keep a formatted data dir across restarts; (re)format only when it is missing or does not
# belong to the recorded cluster id / Kafka version.
ensure_storage() {
  local cid="" reason=""
  [ -s "$CLUSTER_ID_FILE" ] && cid="$(tr -d '[:space:]' <"$CLUSTER_ID_FILE")"
  if [ -z "$cid" ]; then
    reason="no cluster id yet"
  elif [ ! -f "$DATA_DIR/meta.properties" ]; then
    reason="no meta.properties in $DATA_DIR"
  elif ! grep -qx "cluster.id=$cid" "$DATA_DIR/meta.properties"; then
    reason="meta.properties does not match cluster id $cid"
  elif ! grep -qx "node.id=1" "$DATA_DIR/meta.properties"; then
    reason="meta.properties has another node.id"
  elif [ "$(cat "$FORMAT_VERSION_FILE" 2>/dev/null || true)" != "$KAFKA_VERSION" ]; then
    reason="data dir was formatted by Kafka $(cat "$FORMAT_VERSION_FILE" 2>/dev/null || echo '?'), not $KAFKA_VERSION"
  fi
  [ -z "$reason" ] && return 0

  log "formatting storage ($reason)"
  [ -n "$cid" ] || cid="$(new_cluster_id)"
  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR"
  rm -f "$FORMAT_VERSION_FILE"
  if ! storage_tool format -t "$cid" -c "$CONFIG_FILE" >"$KDIR/format.log" 2>&1; then
    cat "$KDIR/format.log" >&2
    die "StorageTool format failed"
  fi
  printf '%s\n' "$cid" >"$CLUSTER_ID_FILE"
  printf '%s\n' "$KAFKA_VERSION" >"$FORMAT_VERSION_FILE"
  log "formatted cluster $cid in $DATA_DIR"
}

wait_ready() {
  local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log_tail
      die "broker process $pid exited during startup"
    fi
    if grep -q "Kafka Server started" "$LOG_FILE" 2>/dev/null && kafka_answers "$PORT"; then
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log_tail
      die "broker not ready after ${START_TIMEOUT}s (pid $pid still running; stop it with: $0 stop)"
    fi
    sleep 0.5
  done
}

cmd_start() {
  if port_open "$PORT"; then
    if pid="$(our_pid)"; then
      if ! kafka_answers "$PORT"; then
        log "broker pid $pid is starting; waiting"
        wait_ready "$pid"
      fi
      log "already running (pid $pid) on 127.0.0.1:$PORT"
    elif kafka_answers "$PORT"; then
      log "a Kafka broker already answers on 127.0.0.1:$PORT; reusing it (not started by this script)"
    else
      die "127.0.0.1:$PORT is taken by something that does not answer as Kafka (set NBV_KAFKA_PORT)"
    fi
    return 0
  fi
  if pid="$(our_pid)"; then
    # Our process is alive but the port is not open yet (e.g. a concurrent start): just wait.
    log "broker pid $pid is starting; waiting"
    wait_ready "$pid"
    log "ready on 127.0.0.1:$PORT"
    return 0
  fi
  if port_open "$CONTROLLER_PORT"; then
    die "controller port 127.0.0.1:$CONTROLLER_PORT is taken by another process (set NBV_KAFKA_CONTROLLER_PORT)"
  fi

  local t0=$SECONDS
  ensure_libs
  command -v java >/dev/null 2>&1 || ensure_tools
  mkdir -p "$KDIR"
  write_config
  ensure_storage

  [ -f "$LOG_FILE" ] && mv -f "$LOG_FILE" "$LOG_FILE.1"
  log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$PORT (controller :$CONTROLLER_PORT, state $KDIR)"
  # setsid: own session, so the broker outlives the caller's terminal and process group. The
  # small bash writes its own pid and execs java, so the pid file names the JVM itself.
  rm -f "$PID_FILE"
  # shellcheck disable=SC2016  # $$ and $@ expand in that inner bash, not here
  (cd "$KDIR" && exec setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
      java "${JAVA_OPTS[@]}" -cp "$LIBS_DIR/*" kafka.Kafka "$CONFIG_FILE" \
      >"$LOG_FILE" 2>&1 </dev/null 9>&-) &
  local pid="" _
  for _ in $(seq 1 50); do
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && break
    sleep 0.1
  done
  [[ "$pid" =~ ^[0-9]+$ ]] || { log_tail; die "broker did not start (no pid file)"; }
  wait_ready "$pid"
  log "ready on 127.0.0.1:$PORT (pid $pid, $((SECONDS - t0))s)"
}

cmd_stop() {
  local pid
  if ! pid="$(our_pid)"; then
    rm -f "$PID_FILE"
    if port_open "$PORT"; then
      log "127.0.0.1:$PORT is served by a process this script did not start; leaving it alone"
    else
      log "not running"
    fi
    return 0
  fi
  log "stopping pid $pid (SIGTERM, controlled shutdown)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "still running after ${STOP_TIMEOUT}s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.3
  done
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  local pid=""
  pid="$(our_pid || true)"
  if port_open "$PORT"; then
    if [ -n "$pid" ]; then
      log "running on 127.0.0.1:$PORT (pid $pid, Kafka $KAFKA_VERSION, state $KDIR)"
    else
      log "127.0.0.1:$PORT accepts connections (not started by this script)"
    fi
    return 0
  fi
  if [ -n "$pid" ]; then
    log "pid $pid alive but 127.0.0.1:$PORT not accepting connections (starting or stuck; log $LOG_FILE)"
  else
    log "not running"
  fi
  return 3
}

cmd_reset() {
  cmd_stop
  log "wiping $DATA_DIR and the cluster id"
  rm -rf "$DATA_DIR" "$CLUSTER_ID_FILE" "$FORMAT_VERSION_FILE"
}

# One start/stop/reset at a time per state dir (e.g. parallel test workers calling start).
take_lock() {
  mkdir -p "$STATE_DIR"
  exec 9>"$STATE_DIR/.kafka.lock"
  if command -v flock >/dev/null 2>&1 && ! flock -w 300 9; then die "timed out waiting for $STATE_DIR/.kafka.lock"; fi
}

case "${1:-}" in
  start) take_lock; cmd_start ;;
  stop) take_lock; cmd_stop ;;
  restart) take_lock; cmd_stop; cmd_start ;;
  status) cmd_status ;;
  reset) take_lock; cmd_reset ;;
  bootstrap) printf '127.0.0.1:%s\n' "$PORT" ;;
  version) printf '%s\n' "$KAFKA_VERSION" ;;
  *) printf 'usage: %s start|stop|restart|status|reset|bootstrap|version\n' "$0" >&2; exit 2 ;;
esac
