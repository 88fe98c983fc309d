#!/usr/bin/env bash
# Load scenarios of issues 10 and 18, side by side in one run: direct, poolsocks (pool off, pool
# on with default and tuned limits), the baselines minirelay (a minimal tokio relay) and fixedpool
# (a minimal fixed-stock pool), Dante and microsocks.
#
#   bash loadtests/run.sh                 full run (~15-20 min), tables and plots in loadtests/results/
#   bash loadtests/run.sh --smoke         every scenario that can run here, ~1-2 s each (CI);
#                                         results go to a temporary folder, the tree stays clean
#   options: --rounds N (default 2, smoke 1)   --only distant,fast-local,...   --keep (keep raw JSON)
#            --configs pool-off,minirelay,...  (only those configurations: repeat runs of a pair)
#            --out DIR (tables and plots there instead of loadtests/results/)
#            --linger S (seconds sampled after the many-destinations load; default 15, smoke 1)
#
# Scenarios: distant-10ms, distant-50ms, requests-per-session, step-demand, fast-local,
# fast-local-paced (the same at an offered rate every proxy carries), bulk,
# idle-sessions, many-destinations, many-destinations-10k, syscalls (strace -c), udp (datagram
# round trips through UDP ASSOCIATE: direct, poolsocks, Dante), fleet (loadtests/fleet.sh:
# several instances behind HAProxy, Prometheus). The distant ones and step-demand need root and
# /dev/net/tun (a TUN delay line into a network namespace); they are skipped with a message
# where that is not possible, as syscalls is without a working strace. Traffic goes only to
# loopback and to 198.18.0.0/15 inside the namespace. Every process started here is stopped on
# exit, and each has its own time limit as well.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LT="$ROOT/loadtests"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
LOADGEN="$TARGET_DIR/release/loadgen"
DELAYLINE="${DELAYLINE:-$TARGET_DIR/release/delayline}"  # another build for an A/B of the line
POOLSOCKS="${POOLSOCKS:-$TARGET_DIR/release/poolsocks}"  # another build for an A/B
MINIRELAY="$TARGET_DIR/release/minirelay"
SOCKSFLOOR="$TARGET_DIR/release/socksfloor"
FIXEDPOOL="$TARGET_DIR/release/fixedpool"

SMOKE=0
ROUNDS=""
ONLY=""
KEEP=0
CONFIGS=""
OUT_DIR=""
LINGER_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --keep) KEEP=1 ;;
    --configs) CONFIGS="$2"; shift ;;
    --out) OUT_DIR="$2"; shift ;;
    --linger) LINGER_ARG="$2"; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  ROUNDS=${ROUNDS:-1}; DURATION=1; WARMUP=0.3; BULK_MIB=64; HOLD_SESSIONS=200; HOLD_SECS=1; LINGER=1
  STEP_PHASES=2:0.5,32:1,2:1; STRACE_SESSIONS=300; UDP_HOLD=50; PACED_RATE=500
  STRICT=(--fail-on-errors)
else
  ROUNDS=${ROUNDS:-2}; DURATION=5; WARMUP=1; BULK_MIB=4096; HOLD_SESSIONS=10000; HOLD_SECS=5; LINGER=15
  STEP_PHASES=2:5,32:10,2:35; STRACE_SESSIONS=5000; UDP_HOLD=1000; PACED_RATE=3000
  STRICT=()
fi
WORK=$(mktemp -d /tmp/poolsocks-loadtests.XXXXXX)
LINGER=${LINGER_ARG:-$LINGER}
if [ -n "$OUT_DIR" ]; then OUT="$OUT_DIR"; elif [ "$SMOKE" = 1 ]; then OUT="$WORK/results"; else OUT="$LT/results"; fi
RAW="$WORK/raw"
mkdir -p "$OUT" "$RAW"

# Fixed ports below 16384: the ephemeral range is moved to 16384-65000 during the run.
FAST_UPSTREAM=127.0.0.1:14080
UDP_ECHO=127.0.0.1:14090
MANY_UPSTREAM=127.0.0.1:12000-12999
# 10,000 destinations: 2,500 loopback addresses (127.1.0.1-127.1.9.196) x 4 ports.
MANY10K_UPSTREAM=127.1.0.1-127.1.9.196:12000-12003
NS=poolsocks-lt
NEAR_IF=ltnear0
FAR_IF=ltfar0
NEAR_ADDR=198.18.0.1
FAR_ADDR=198.18.1.1
FAR_UPSTREAM=$FAR_ADDR:80
declare -A PROXY_PORT=([poolsocks]=14101 [pool-off]=14101 [pool-default]=14102 [pool-tuned]=14103 [dante]=14105 [microsocks]=14106 [minirelay]=14107 [fixedpool]=14108 [socksfloor]=14109)
declare -A STATS_PORT=([pool-off]=14111 [pool-default]=14112 [pool-tuned]=14113 [fixedpool]=14118)
declare -A STATS_PATH=([pool-off]=/api/pool/stats [pool-default]=/api/pool/stats [pool-tuned]=/api/pool/stats [fixedpool]=/)
# fixedpool: the "least a pool can be" of issue 18: 64 spares per destination (pool-tuned's
# max_idle_per_dest), at most 1,000 in all (its max_total_idle; at the cap it dials no more).
FIXEDPOOL_ARGS=(--spares 64 --max-total 1000)

PIDS=()
FAILED=()
SKIPPED=()
NOTES=()
SAVED_PORT_RANGE=""
SAVED_TW_REUSE=""
START=$SECONDS

say() { printf '[run.sh %4ss] %s\n' "$((SECONDS - START))" "$*" >&2; }
skip() { say "SKIP: $*"; SKIPPED+=("$*"); }

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  if [ -n "$SAVED_PORT_RANGE" ]; then sysctl -qw net.ipv4.ip_local_port_range="$SAVED_PORT_RANGE" || true; fi
  if [ -n "$SAVED_TW_REUSE" ]; then sysctl -qw net.ipv4.tcp_tw_reuse="$SAVED_TW_REUSE" || true; fi
  if [ "$KEEP" = 1 ]; then say "raw records kept in $RAW"; else rm -rf "$RAW"; fi
}
trap cleanup EXIT

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# Waits until something accepts on HOST:PORT (up to ~5 s).
wait_port() {
  local host=$1 port=$2 i
  for i in $(seq 1 50); do
    if timeout 0.5 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

port_free() { ! timeout 0.5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- build and peers
say "building loadgen, delayline and poolsocks (release)"
(cd "$ROOT" && cargo build --release -p loadgen --bins) || { say "FAIL: loadgen does not build"; exit 1; }
if ! (cd "$ROOT" && cargo build --release -p poolsocks --bin poolsocks); then
  say "poolsocks does not build: its configurations are skipped"
fi
HAVE=(direct minirelay)
if [ -x "$POOLSOCKS" ]; then
  HAVE+=(pool-off pool-default pool-tuned)
else
  skip "poolsocks: no $POOLSOCKS (daemon not built); pool-off/pool-default/pool-tuned skipped"
fi

install_peer() { # binary package
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then return 1; fi
  say "installing $2"
  DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq "$2" >/dev/null 2>&1 && return 0
  timeout 300 apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq "$2" >/dev/null 2>&1
}
HAVE+=(fixedpool socksfloor)
if install_peer danted dante-server; then HAVE+=(dante); else skip "Dante: danted missing and dante-server could not be installed"; fi
if install_peer microsocks microsocks; then HAVE+=(microsocks); else skip "microsocks: missing and could not be installed"; fi
if [ -n "$CONFIGS" ]; then
  chosen=()
  for cfg in "${HAVE[@]}"; do
    if [[ ",$CONFIGS," == *",$cfg,"* ]]; then chosen+=("$cfg"); fi
  done
  HAVE=("${chosen[@]}")
fi
say "configurations: ${HAVE[*]}"

for port in 14080 14090 14101 14102 14103 14105 14106 14107 14108 14109 14111 14112 14113 14118; do
  port_free "$port" || { say "FAIL: port $port is in use; run.sh needs 12000-12999 and 14080-14118 free"; exit 1; }
done

# Proxies started below inherit this: 10,000 held sessions need 20,000 descriptors in a proxy
# (poolsocks also raises its own limit; Dante and microsocks do not).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ "$(id -u)" = 0 ]; then
  # Many short sessions: more ephemeral ports, and TIME_WAIT ports reused for new outgoing
  # connections (loopback already does that; the delay-line addresses do not). Restored on exit.
  SAVED_PORT_RANGE=$(sysctl -n net.ipv4.ip_local_port_range | tr '\t' ' ')
  SAVED_TW_REUSE=$(sysctl -n net.ipv4.tcp_tw_reuse)
  sysctl -qw net.ipv4.ip_local_port_range="16384 65000"
  sysctl -qw net.ipv4.tcp_tw_reuse=1
fi

# ---------------------------------------------------------------- proxies
# Writes the Dante config for an external (outgoing) address.
dante_conf() {
  cat > "$WORK/danted-$1.conf" <<EOF
logoutput: $WORK/danted.log
internal: 127.0.0.1 port = ${PROXY_PORT[dante]}
external: $1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
EOF
}

# Starts proxy $1 with outgoing address $2; sets PROXY_PID (empty for direct).
start_proxy() {
  local cfg=$1 external=$2
  PROXY_PID=""
  case "$cfg" in
    direct) return 0 ;;
    pool-*) "$POOLSOCKS" --config "$LT/configs/$cfg.toml" >"$WORK/$cfg.log" 2>&1 & ;;
    # UDP ASSOCIATE does not use the pool: one poolsocks configuration (pool-off's file).
    poolsocks) "$POOLSOCKS" --config "$LT/configs/pool-off.toml" >"$WORK/$cfg.log" 2>&1 & ;;
    dante) dante_conf "$external"; danted -f "$WORK/danted-$external.conf" -p "$WORK/danted.pid" >>"$WORK/dante.log" 2>&1 & ;;
    microsocks) microsocks -i 127.0.0.1 -p "${PROXY_PORT[microsocks]}" >"$WORK/microsocks.log" 2>&1 & ;;
    minirelay) "$MINIRELAY" --listen "127.0.0.1:${PROXY_PORT[minirelay]}" --duration 3600 >"$WORK/minirelay.log" 2>&1 & ;;
    socksfloor) "$SOCKSFLOOR" --listen "127.0.0.1:${PROXY_PORT[socksfloor]}" --duration 3600 >"$WORK/socksfloor.log" 2>&1 & ;;
    fixedpool) "$FIXEDPOOL" --listen "127.0.0.1:${PROXY_PORT[fixedpool]}" \
                 --stats "127.0.0.1:${STATS_PORT[fixedpool]}" "${FIXEDPOOL_ARGS[@]}" --duration 3600 \
                 >"$WORK/fixedpool.log" 2>&1 & ;;
  esac
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  if ! wait_port 127.0.0.1 "${PROXY_PORT[$cfg]}"; then
    say "FAIL: $cfg did not start listening; its log:"; tail -5 "$WORK/$cfg.log" "$WORK/dante.log" 2>/dev/null >&2 || true
    stop_pid "$PROXY_PID"; PROXY_PID=""
    return 1
  fi
}

route_args() { # cfg
  if [ "$1" = direct ]; then echo --direct; else echo --proxy "127.0.0.1:${PROXY_PORT[$1]}"; fi
}

# Prints the configurations of "$@" for round $ROUND_NO, shuffled with the round number as
# the seed (the same order on every run). A fixed order left one configuration 10% behind
# another it equals; a rotation still ran each one right after the same neighbour and the
# same time after direct's burst of connections, every round (on 1,000 destinations the two
# pool configurations, third and fourth after direct, drew 0.89-0.94x pool-off while their
# CPU per session was level with it).
shuffled() {
  local list=("$@") i j swap
  RANDOM=$((ROUND_NO * 7919))
  for ((i = ${#list[@]} - 1; i > 0; i--)); do
    j=$((RANDOM % (i + 1)))
    swap=${list[$i]}; list[$i]=${list[$j]}; list[$j]=$swap
  done
  printf '%s\n' "${list[@]}"
}

# Runs `loadgen $mode ...` against every configuration, ROUNDS times, interleaved.
# usage: measure SCENARIO EXTERNAL_ADDR MODE [loadgen args...]
# MEASURE_ONLY="cfg cfg" limits it to those configurations; MEASURE_STRACE=1 counts each
# proxy's syscalls (loadgen run --strace-pid).
MEASURE_ONLY=""
MEASURE_STRACE=0
measure() {
  local scenario=$1 external=$2 mode=$3; shift 3
  local round cfg dir="$RAW/$scenario" args
  mkdir -p "$dir"
  for round in $(seq 1 "$ROUNDS"); do
    ROUND_NO=$round
    for cfg in $(shuffled "${HAVE[@]}"); do
      if [ "$mode" = hold ] && [ "$cfg" = direct ]; then continue; fi
      if [ -n "$MEASURE_ONLY" ] && [[ " $MEASURE_ONLY " != *" $cfg "* ]]; then continue; fi
      # The floor answers in the destination's place: only a destination that answers at once
      # is one it can stand in for, and only latency at an offered rate compares.
      if [ "$cfg" = socksfloor ] && [ "$scenario" != fast-local-paced ]; then continue; fi
      start_proxy "$cfg" "$external" || { FAILED+=("$scenario/$cfg: proxy did not start"); continue; }
      args=($(route_args "$cfg"))
      if [ "$mode" = hold ] && [ -n "$PROXY_PID" ]; then args+=(--pid "$PROXY_PID"); fi
      # The pool's own counters (poolsocks, fixedpool), sampled once a second unless the
      # scenario asks for more often (idle total, hits, misses, first sightings).
      # Not while strace counts: serving the samples would add the stats endpoint's syscalls.
      if [ "$mode" = run ] && [ -n "${STATS_PORT[$cfg]:-}" ] && [ "$MEASURE_STRACE" = 0 ]; then
        args+=(--sample-url "127.0.0.1:${STATS_PORT[$cfg]}${STATS_PATH[$cfg]}")
        if [[ "$scenario" == many-destinations* ]]; then args+=(--linger "$LINGER"); fi
      fi
      if [ "$MEASURE_STRACE" = 1 ]; then
        [ -n "$PROXY_PID" ] || continue
        args+=(--strace-pid "$PROXY_PID")
      elif [ "$mode" = run ] && [ -n "$PROXY_PID" ] && [ "$cfg" != dante ]; then
        # The proxy's CPU per session (Dante serves from forked children: not one process).
        args+=(--cpu-pid "$PROXY_PID")
      fi
      local strict=()
      # Our own daemon and the baseline must not fail in smoke runs; the peers' hiccups are
      # reported in the tables but are not our regression.
      case "$cfg" in direct|pool-*) strict=("${STRICT[@]}") ;; esac
      say "$scenario round $round/$ROUNDS: $cfg"
      if ! timeout 600 "$LOADGEN" "$mode" "${args[@]}" "$@" "${strict[@]}" --label "$cfg" \
          --scenario "$scenario" --round "$round" --json "$dir/$cfg-r$round-$RANDOM.json"; then
        FAILED+=("$scenario/$cfg round $round")
        say "FAIL: $scenario/$cfg round $round"
      fi
      if [ -n "$PROXY_PID" ]; then stop_pid "$PROXY_PID"; fi
    done
  done
}

report() { # scenario description [extra report args]
  local scenario=$1 description=$2; shift 2
  [ -d "$RAW/$scenario" ] || return 0
  local notes="Machine: $(nproc) cores, $(uname -r); load generator on the same machine (1 runtime thread). Run $(date -u +%Y-%m-%dT%H:%MZ)."
  [ "$SMOKE" = 1 ] && notes+=" SMOKE run: figures are not meaningful."
  [ ${#SKIPPED[@]} -gt 0 ] && notes+=" Skipped: $(IFS=';'; echo "${SKIPPED[*]}")."
  [ ${#NOTES[@]} -gt 0 ] && notes+=" $(IFS=' '; echo "${NOTES[*]}")"
  "$LOADGEN" report --input "$RAW/$scenario" --out "$OUT" --scenario "$scenario" \
    --description "$description" --notes "$notes" "$@" || FAILED+=("$scenario: report")
}

start_upstream() { # listen-spec name [netns]
  local spec=$1 name=$2 ns=${3:-}
  if [ -n "$ns" ]; then
    ip netns exec "$ns" "$LOADGEN" upstream --listen "$spec" --duration 3600 \
      --stats-file "$WORK/$name.stats.json" >"$WORK/$name.log" 2>&1 &
  else
    "$LOADGEN" upstream --listen "$spec" --duration 3600 \
      --stats-file "$WORK/$name.stats.json" >"$WORK/$name.log" 2>&1 &
  fi
  UPSTREAM_PID=$!
  PIDS+=("$UPSTREAM_PID")
}

# ---------------------------------------------------------------- delay line
DELAY_PID=""
FAR_UPSTREAM_PID=""
delay_ok=1
if [ "$(id -u)" != 0 ] || [ ! -c /dev/net/tun ] || ! command -v ip >/dev/null; then
  delay_ok=0
  skip "distant scenarios: need root, /dev/net/tun and iproute2 for the TUN delay line"
fi

# Brings up the delay line with RTT $1 ms and an upstream inside the namespace.
delay_up() {
  delay_down
  ip netns del "$NS" 2>/dev/null || true
  ip netns add "$NS" || return 1
  "$DELAYLINE" --netns "$NS" --rtt-ms "$1" --near-if "$NEAR_IF" --far-if "$FAR_IF" \
    --near-addr "$NEAR_ADDR" --far-addr "$FAR_ADDR" --duration 3600 --realtime-priority "${DELAY_PRIO:-10}" >"$WORK/delayline.log" 2>&1 &
  DELAY_PID=$!
  PIDS+=("$DELAY_PID")
  local i
  for i in $(seq 1 50); do grep -q '^ready' "$WORK/delayline.log" 2>/dev/null && break; sleep 0.1; done
  if ! grep -q '^ready' "$WORK/delayline.log"; then
    say "delay line failed: $(tail -2 "$WORK/delayline.log")"; delay_down; return 1
  fi
  start_upstream "$FAR_UPSTREAM" far "$NS"
  FAR_UPSTREAM_PID=$UPSTREAM_PID
  wait_port "$FAR_ADDR" 80 || { say "upstream in the namespace did not come up"; delay_down; return 1; }
}

delay_down() {
  if [ -n "$FAR_UPSTREAM_PID" ]; then stop_pid "$FAR_UPSTREAM_PID"; FAR_UPSTREAM_PID=""; fi
  if [ -n "$DELAY_PID" ]; then stop_pid "$DELAY_PID"; DELAY_PID=""; fi
  ip netns del "$NS" 2>/dev/null || true
}

# The line itself: a one-request direct session must cost ~2 RTT, a request on an open
# connection ~1 RTT. Recorded in results/delay-line-check.md.
check_line() { # rtt
  local rtt=$1 json="$WORK/line-check-$1.json" line
  "$LOADGEN" run --direct --target "$FAR_UPSTREAM" -c 1 -d "$DURATION" -n 5 --label line-check \
    --json "$json" >/dev/null 2>&1 || return 1
  line=$(python3 - "$json" "$rtt" <<'EOF' 2>/dev/null || true
import json, sys
r = json.load(open(sys.argv[1])); rtt = float(sys.argv[2])
s, q = r["session_latency"], r["request_latency"]
first = (s["p50_us"] - 4 * q["p50_us"]) / 1000  # connect + first request, from 5-request sessions
print(f"| {rtt:g} ms | {q['p50_us']/1000:.2f} ms ({q['p50_us']/1000/rtt:.2f} RTT) | {first:.2f} ms ({first/rtt:.2f} RTT) |")
EOF
)
  if [ -z "$line" ]; then
    # Without python: one-request sessions give the connect + request figure directly.
    line="| $rtt ms | see raw record | see raw record |"
  fi
  "$LOADGEN" run --direct --target "$FAR_UPSTREAM" -c 1 -d "$DURATION" -n 1 --label line-check-1 \
    --json "$WORK/line-check1-$rtt.json" > "$WORK/line-check1-$rtt.txt" 2>/dev/null || return 1
  LINE_ROWS+=("$line $(grep -o 'p50 [0-9.]* ms' "$WORK/line-check1-$rtt.txt" | head -1 | sed 's/p50 //') |")
}
LINE_ROWS=()

distant() { # rtt
  local rtt=$1 scenario="distant-$1ms"
  delay_up "$rtt" || { skip "$scenario: delay line could not start"; return 0; }
  check_line "$rtt" || FAILED+=("delay line check at $rtt ms")
  measure "$scenario" "$NEAR_ADDR" run --target "$FAR_UPSTREAM" -c 16 -d "$DURATION" \
    --warmup "$WARMUP" -n 1 --upstream-stats "$FAR_UPSTREAM"
  report "$scenario" "One destination behind a ${rtt} ms RTT delay line (TUN, userspace), 16 closed-loop clients, 1 HTTP request per SOCKS session, ${DURATION} s after ${WARMUP} s warm-up. Latency is the whole session (connect, SOCKS, request, response). \"upstream conns / session\" is counted by the upstream server itself." --rtt-ms "$rtt"
}

if [ "$delay_ok" = 1 ]; then
  for rtt in 10 50; do
    wanted "distant-${rtt}ms" && distant "$rtt"
  done
  if wanted requests-per-session; then
    if delay_up 10; then
      for n in 1 2 5; do
        measure requests-per-session "$NEAR_ADDR" run --target "$FAR_UPSTREAM" -c 16 \
          -d "$DURATION" --warmup "$WARMUP" -n "$n" --upstream-stats "$FAR_UPSTREAM"
      done
      report requests-per-session "10 ms RTT delay line, 16 clients, 1, 2 and 5 keep-alive requests per SOCKS session: the pool saves one RTT per session, a smaller share as sessions get longer. Latency is the whole session." --rtt-ms 10
    else
      skip "requests-per-session: delay line could not start"
    fi
  fi
  if wanted step-demand; then
    # A change in demand (issue 18, goal 3): 2 clients, a step to 32, back to 2, on one
    # destination 10 ms away; the pools' counters sampled every 100 ms, every session logged.
    if delay_up 10; then
      MEASURE_ONLY="pool-default pool-tuned fixedpool"
      measure step-demand "$NEAR_ADDR" run --target "$FAR_UPSTREAM" --phases "$STEP_PHASES" -n 1 \
        --sample-interval-ms 100 --session-log --upstream-stats "$FAR_UPSTREAM"
      MEASURE_ONLY=""
      report step-demand "One destination behind a 10 ms RTT delay line, 1 request per session, closed-loop clients stepping ${STEP_PHASES//,/, } (clients:seconds): how fast each pool follows a rise in demand, and what it keeps once demand falls. Each pool's counters are sampled every 100 ms; every session's start and latency is logged." --rtt-ms 10
    else
      skip "step-demand: delay line could not start"
    fi
  fi
  delay_down
  if [ ${#LINE_ROWS[@]} -gt 0 ]; then
    {
      echo "# delay-line check"
      echo
      echo "The TUN delay line (loadtests/src/bin/delayline.rs) measured with \`loadgen run --direct\`, 1 client."
      echo "A request on an established connection should cost ~1 RTT; connect + first request ~2 RTT."
      echo
      echo "| RTT | request on an open connection (p50) | connect + first request (p50, from 5-request sessions) | one-request session (p50) |"
      echo "|---|---|---|---|"
      printf '%s\n' "${LINE_ROWS[@]}"
    } > "$OUT/delay-line-check.md"
  fi
fi

# ---------------------------------------------------------------- loopback scenarios
if wanted fast-local || wanted fast-local-paced || wanted bulk || wanted idle-sessions; then
  start_upstream "$FAST_UPSTREAM" fast
  wait_port 127.0.0.1 14080 || { say "FAIL: upstream did not start"; exit 1; }
  if wanted fast-local; then
    measure fast-local 127.0.0.1 run --target "$FAST_UPSTREAM" -c 16 -d "$DURATION" \
      --warmup "$WARMUP" -n 1 --upstream-stats "$FAST_UPSTREAM"
    report fast-local "Loopback destination that answers at once, 16 closed-loop clients, 1 request per SOCKS session, ${DURATION} s after ${WARMUP} s warm-up: the proxy's own cost per session."
  fi
  if wanted fast-local-paced; then
    # At saturation a closed loop's latency is clients / throughput, so a proxy's p99 there
    # mostly says how much slower than direct it is. At one offered rate that every
    # configuration carries (Dante peaks near 5,500 sessions/s here), latency is what each adds.
    measure fast-local-paced 127.0.0.1 run --target "$FAST_UPSTREAM" -c 32 --rate "$PACED_RATE" \
      -d "$DURATION" --warmup "$WARMUP" -n 1 --upstream-stats "$FAST_UPSTREAM"
    report fast-local-paced "The fast-local destination at an offered ${PACED_RATE} sessions/s (32 clients, each on its own timetable), 1 request per SOCKS session, ${DURATION} s after ${WARMUP} s warm-up: latency a proxy adds when it is not saturated."
  fi
  if wanted bulk; then
    measure bulk 127.0.0.1 bulk --target "$FAST_UPSTREAM" --mib "$BULK_MIB"
    report bulk "One ${BULK_MIB} MiB download over loopback through each proxy (HTTP body of zeros from the loadgen upstream)."
  fi
  if wanted idle-sessions; then
    FD_NOTE=""
    HARD_NOFILE=$(ulimit -Hn)
    if [ "$HARD_NOFILE" != unlimited ] && [ "$HARD_NOFILE" -lt $((2 * HOLD_SESSIONS + 128)) ]; then
      FD_NOTE=" This machine's hard open-file limit is $HARD_NOFILE and cannot be raised here (no CAP_SYS_RESOURCE): a single-process proxy needs 2 descriptors per held session plus its own (listeners, epoll, stdio), so the last few sessions fail with 0x01 (poolsocks logs a warning naming the figures at start). Dante spreads sessions over child processes, each with its own limit."
      say "hard open-file limit $HARD_NOFILE < what $HOLD_SESSIONS held sessions need: expect a few failures in single-process proxies"
    fi
    measure idle-sessions 127.0.0.1 hold --target "$FAST_UPSTREAM" --sessions "$HOLD_SESSIONS" \
      --hold "$HOLD_SECS"
    report idle-sessions "${HOLD_SESSIONS} SOCKS sessions opened (each proves itself with one request) and held idle ${HOLD_SECS} s; memory per session = (proxy memory while holding - before) / sessions held, as PSS (proportional set size, so pages shared by Dante's forked children count once), children included.$FD_NOTE"
  fi
  stop_pid "$UPSTREAM_PID"
fi

if wanted syscalls; then
  # Syscalls per session (issue 18, goal 4): strace -c -f on the proxy over a fixed number of
  # one-request sessions to the fast loopback destination. Under strace the proxy is slow;
  # only the counts mean anything.
  if command -v strace >/dev/null && timeout 10 strace -c -o /dev/null true 2>/dev/null; then
    start_upstream "$FAST_UPSTREAM" fast
    wait_port 127.0.0.1 14080 || { say "FAIL: upstream did not start"; exit 1; }
    MEASURE_ONLY="minirelay pool-off pool-default pool-tuned fixedpool"
    MEASURE_STRACE=1
    measure syscalls 127.0.0.1 run --target "$FAST_UPSTREAM" -c 16 -d 300 -n 1 \
      --sessions "$STRACE_SESSIONS" --upstream-stats "$FAST_UPSTREAM"
    MEASURE_ONLY=""
    MEASURE_STRACE=0
    report syscalls "Syscalls of the proxy process (all its threads, \`strace -c -f -p PID\`) over ${STRACE_SESSIONS} one-request SOCKS sessions to the fast loopback destination, 16 clients, divided by the sessions. Counting starts before the first session and stops 0.3 s after the last; background dials of a pool are counted. Latency and rps under strace are not meaningful and are not shown."
    stop_pid "$UPSTREAM_PID"
  else
    skip "syscalls: strace is missing or cannot trace here"
  fi
fi

if wanted many-destinations; then
  start_upstream "$MANY_UPSTREAM" many
  wait_port 127.0.0.1 12999 || { say "FAIL: upstream on 1,000 ports did not start"; exit 1; }
  measure many-destinations 127.0.0.1 run --target "$MANY_UPSTREAM" -c 16 -d "$DURATION" \
    --warmup "$WARMUP" -n 1 --upstream-stats 127.0.0.1:12000
  report many-destinations "1,000 loopback destinations (ports 12000-12999) in a random mix, 16 clients, 1 request per session. fixedpool keeps at most 1,000 spares in all (\`--max-total 1000\`), like pool-tuned's max_total_idle. \"max idle sampled\" is the largest idle count seen on the proxy's /api/pool/stats, sampled every second while running (a sum of per-destination views read one after another); \"budget high water\" is the most slots the GlobalBudget ever held at once (reserved, lent, pooled or evicting), its own exact record; \"idle after load\" is total_idle sampled ${LINGER} s after the load stopped (pool-tuned has idle_timeout_secs = 10, pool-default 90). The upstream column counts port 12000's server process, which serves all 1,000 ports."
  stop_pid "$UPSTREAM_PID"
fi

if wanted many-destinations-10k; then
  # Ports run short for 10,000 listeners on one address: 2,500 loopback addresses x 4 ports,
  # each address:port its own listener in one upstream process.
  start_upstream "$MANY10K_UPSTREAM" many10k
  wait_port 127.1.9.196 12003 || { say "FAIL: upstream on 10,000 addresses did not start: $(tail -2 "$WORK/many10k.log")"; exit 1; }
  measure many-destinations-10k 127.0.0.1 run --target "$MANY10K_UPSTREAM" -c 16 -d "$DURATION" \
    --warmup "$WARMUP" -n 1 --upstream-stats 127.1.0.1:12000
  report many-destinations-10k "10,000 loopback destinations (addresses 127.1.0.1-127.1.9.196, ports 12000-12003) in a random mix, 16 clients, 1 request per session: most destinations are seen once or twice in a run. Columns as in many-destinations; fixedpool keeps at most 1,000 spares in all. \"idle after load\" is total_idle ${LINGER} s after the load stopped. The upstream column counts the one server process behind all 10,000 listeners."
  stop_pid "$UPSTREAM_PID"
fi

# ---------------------------------------------------------------- UDP
# Datagram round trips through a UDP association (each client its own, closed loop), direct
# and through poolsocks and Dante (microsocks has no UDP ASSOCIATE); then idle associations.
measure_udp() { # mode [loadgen args...]
  local mode=$1; shift
  local round cfg dir="$RAW/udp" args strict
  mkdir -p "$dir"
  for round in $(seq 1 "$ROUNDS"); do
    ROUND_NO=$round
    for cfg in $(shuffled "${UDP_HAVE[@]}"); do
      if [ "$mode" = udp-hold ] && [ "$cfg" = direct ]; then continue; fi
      start_proxy "$cfg" 127.0.0.1 || { FAILED+=("udp/$cfg: proxy did not start"); continue; }
      args=($(route_args "$cfg"))
      if [ "$mode" = udp-hold ] && [ -n "$PROXY_PID" ]; then args+=(--pid "$PROXY_PID"); fi
      strict=()
      case "$cfg" in direct|poolsocks) strict=("${STRICT[@]}") ;; esac
      say "udp $mode $* round $round/$ROUNDS: $cfg"
      if ! timeout 600 "$LOADGEN" "$mode" "${args[@]}" "$@" "${strict[@]}" --label "$cfg" \
          --scenario udp --round "$round" --json "$dir/$cfg-$mode-r$round-$RANDOM.json"; then
        FAILED+=("udp/$cfg $mode $* round $round")
        say "FAIL: udp/$cfg $mode round $round"
      fi
      if [ -n "$PROXY_PID" ]; then stop_pid "$PROXY_PID"; fi
    done
  done
}

if wanted udp; then
  UDP_HAVE=(direct)
  [ -x "$POOLSOCKS" ] && UDP_HAVE+=(poolsocks)
  [[ " ${HAVE[*]} " == *" dante "* ]] && UDP_HAVE+=(dante)
  "$LOADGEN" udp-echo --listen "$UDP_ECHO" --duration 3600 >"$WORK/udp-echo.log" 2>&1 &
  UDP_ECHO_PID=$!
  PIDS+=("$UDP_ECHO_PID")
  for i in $(seq 1 50); do grep -q listening "$WORK/udp-echo.log" 2>/dev/null && break; sleep 0.1; done
  for payload in 64 1400; do
    measure_udp udp --target "$UDP_ECHO" -c 16 -d "$DURATION" --warmup "$WARMUP" --payload "$payload"
  done
  measure_udp udp-hold --target "$UDP_ECHO" --sessions "$UDP_HOLD" --hold "$HOLD_SECS"
  report udp "UDP echo on loopback, 16 closed-loop clients each with its own UDP association (direct: its own socket), one datagram in flight per client, ${DURATION} s after ${WARMUP} s warm-up, 64- and 1,400-byte payloads; a datagram not echoed within 1 s counts as lost. Latency is one datagram's round trip. Then ${UDP_HOLD} associations opened (each proves itself with one round trip) and held idle ${HOLD_SECS} s: memory per association = (proxy memory while holding - before) / associations held, as PSS, children included."
  stop_pid "$UDP_ECHO_PID"
fi

if wanted fleet; then
  # 1, 2 and 3 instances behind HAProxy with a Prometheus scraping them (loadtests/fleet.sh, its
  # own delay line and ports 14200-14221). It restores the sysctls it changes on its own exit.
  fleet_args=(--out "$OUT" --rounds "$ROUNDS")
  [ "$SMOKE" = 1 ] && fleet_args+=(--smoke)
  say "fleet: bash loadtests/fleet.sh ${fleet_args[*]}"
  bash "$LT/fleet.sh" "${fleet_args[@]}" || FAILED+=("fleet")
fi

say "scenario 7 (actor overhead) is a benchmark of the pool library, not part of this script"

# ---------------------------------------------------------------- summary
say "done in $((SECONDS - START)) s; results in $OUT"
for s in "${SKIPPED[@]}"; do say "skipped: $s"; done
if [ ${#FAILED[@]} -gt 0 ]; then
  for f in "${FAILED[@]}"; do say "FAILED: $f"; done
  exit 1
fi
exit 0
