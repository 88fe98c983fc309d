#!/usr/bin/env bash
# Fleet scenario (issue 19): 1, 2 and 3 poolsocks instances behind HAProxy (mode tcp,
# send-proxy-v2, health checks on /health) at the same total max_total_idle, with
# `balance leastconn` and `balance source`, over the 10 ms TUN delay line. A real Prometheus
# scrapes the instances every second; the fleet hit rate comes from a PromQL query over all of
# them (sum(increase(...))), next to the load generator's own count (it samples every instance's
# /api/pool/stats once a second and sums their hits and misses over the window).
#
#   bash loadtests/fleet.sh                 full run (~3 min): loadtests/results/fleet.md
#   bash loadtests/fleet.sh --smoke         ~1 s per run, results in a temporary folder
#   options: --rounds N (default 2, smoke 1)   --out DIR   --keep
#
# 16 clients, each with its own destination (ports 8000-8015 of one upstream server inside the
# namespace) and its own source address (127.0.0.10-25), one request per SOCKS session: like 16
# application servers each talking to its own backend. Needs root (delay line, sysctls), haproxy
# and prometheus (Debian packages); what is missing is skipped with a message. Traffic goes only
# to loopback and to 198.18.0.0/15 inside the namespace; every process started here has a time
# limit and is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LT="$ROOT/loadtests"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
LOADGEN="$TARGET_DIR/release/loadgen"
DELAYLINE="$TARGET_DIR/release/delayline"
POOLSOCKS="$TARGET_DIR/release/poolsocks"

SMOKE=0; ROUNDS=""; OUT=""; KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    *) echo "fleet.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$SMOKE" = 1 ]; then
  ROUNDS=${ROUNDS:-1}; DURATION=1; WARMUP=1; STRICT=(--fail-on-errors)
else
  ROUNDS=${ROUNDS:-2}; DURATION=5; WARMUP=2; STRICT=()
fi
WORK=$(mktemp -d /tmp/poolsocks-fleet.XXXXXX)
if [ -z "$OUT" ]; then
  if [ "$SMOKE" = 1 ]; then OUT="$WORK/results"; else OUT="$LT/results"; fi
fi
mkdir -p "$OUT" "$WORK/raw"

RTT=10
CLIENTS=16
TOTAL_IDLE=48          # max_total_idle of the whole fleet, split evenly over the instances
PER_DEST=8             # max_idle_per_dest of every instance
NS=poolsocks-fleet
NEAR_ADDR=198.18.2.1
FAR_ADDR=198.18.3.1
TARGETS="$FAR_ADDR:8000-8015"
FRONTEND_PORT=14200
HAPROXY_STATS_PORT=14221
PROM_PORT=14220
SOCKS_PORTS=(14201 14202 14203)
STATS_PORTS=(14211 14212 14213)

PIDS=(); FAILED=(); SKIPPED=()
SAVED_PORT_RANGE=""; SAVED_TW_REUSE=""
START=$SECONDS
say() { printf '[fleet.sh %4ss] %s\n' "$((SECONDS - START))" "$*" >&2; }
skip() { say "SKIP: $*"; SKIPPED+=("$*"); }

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  if [ -n "$SAVED_PORT_RANGE" ]; then sysctl -qw net.ipv4.ip_local_port_range="$SAVED_PORT_RANGE" || true; fi
  if [ -n "$SAVED_TW_REUSE" ]; then sysctl -qw net.ipv4.tcp_tw_reuse="$SAVED_TW_REUSE" || true; fi
  if [ "$KEEP" = 1 ]; then say "work files kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

wait_port() { # host port
  local i
  for i in $(seq 1 100); do
    if timeout 0.5 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- prerequisites
if [ "$(id -u)" != 0 ] || [ ! -c /dev/net/tun ] || ! command -v ip >/dev/null; then
  skip "fleet: needs root, /dev/net/tun and iproute2 for the delay line"; exit 0
fi
for tool in haproxy prometheus promtool python3; do
  command -v "$tool" >/dev/null || { skip "fleet: $tool is not installed"; exit 0; }
done
(cd "$ROOT" && cargo build --release -p loadgen --bins && cargo build --release -p poolsocks --bin poolsocks) \
  || { say "FAIL: build"; exit 1; }
for port in "$FRONTEND_PORT" "$HAPROXY_STATS_PORT" "$PROM_PORT" "${SOCKS_PORTS[@]}" "${STATS_PORTS[@]}"; do
  if timeout 0.5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
    say "FAIL: port $port is in use; fleet.sh needs 14200-14221 free"; exit 1
  fi
done
SAVED_PORT_RANGE=$(sysctl -n net.ipv4.ip_local_port_range | tr '\t' ' ')
SAVED_TW_REUSE=$(sysctl -n net.ipv4.tcp_tw_reuse)
sysctl -qw net.ipv4.ip_local_port_range="16384 65000"
sysctl -qw net.ipv4.tcp_tw_reuse=1
ulimit -n 65536 2>/dev/null || true

# ---------------------------------------------------------------- delay line, upstream
ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
"$DELAYLINE" --netns "$NS" --rtt-ms "$RTT" --near-if flnear0 --far-if flfar0 \
  --near-addr "$NEAR_ADDR" --far-addr "$FAR_ADDR" --duration 1800 >"$WORK/delayline.log" 2>&1 &
PIDS+=($!)
for i in $(seq 1 50); do grep -q '^ready' "$WORK/delayline.log" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready' "$WORK/delayline.log" || { say "FAIL: delay line: $(tail -2 "$WORK/delayline.log")"; exit 1; }
ip netns exec "$NS" "$LOADGEN" upstream --listen "$TARGETS" --duration 1800 >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
wait_port "$FAR_ADDR" 8015 || { say "FAIL: upstream in the namespace did not start"; exit 1; }

# ---------------------------------------------------------------- Prometheus
mkdir -p "$WORK/prom"
cp "$ROOT/deploy/prometheus/poolsocks.rules.yml" "$WORK/prom/"
cat > "$WORK/prom/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - poolsocks.rules.yml
scrape_configs:
  - job_name: poolsocks
    static_configs:
      - targets: [$(printf '"127.0.0.1:%s",' "${STATS_PORTS[@]}" | sed 's/,$//')]
EOF
timeout 1800 prometheus --config.file="$WORK/prom/prometheus.yml" --storage.tsdb.path="$WORK/prom/tsdb" \
  --web.listen-address=127.0.0.1:$PROM_PORT >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_port 127.0.0.1 "$PROM_PORT" || { say "FAIL: prometheus did not start: $(tail -3 "$WORK/prometheus.log")"; exit 1; }
PROM_URL="http://127.0.0.1:$PROM_PORT"
# Ready when it answers a query about its own scrapes.
for i in $(seq 1 100); do
  promtool query instant "$PROM_URL" 'count(up)' 2>/dev/null | grep -q '=>' && break
  sleep 0.2
done

promql() { # time expr -> number (or NaN)
  promtool query instant --time="$1" "$PROM_URL" "$2" 2>/dev/null \
    | sed -n 's/^.*=> \([^ ]*\) @.*$/\1/p' | head -1
}

# ---------------------------------------------------------------- one measurement
INSTANCE_PIDS=()
start_instances() { # n
  local n=$1 i
  INSTANCE_PIDS=()
  for i in $(seq 0 $((n - 1))); do
    cat > "$WORK/poolsocks-$i.toml" <<EOF
[server]
bind_port = ${SOCKS_PORTS[$i]}
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.5/32"]
shutdown_grace_secs = 2

[server.pool]
enabled = true
max_idle_per_dest = $PER_DEST
max_total_idle = $((TOTAL_IDLE / n))

[sessions]
stats_api_enabled = true
stats_api_port = ${STATS_PORTS[$i]}

[logging]
level = "warn"
EOF
    timeout 600 "$POOLSOCKS" --config "$WORK/poolsocks-$i.toml" >"$WORK/poolsocks-$i.log" 2>&1 &
    INSTANCE_PIDS+=($!); PIDS+=($!)
  done
  for i in $(seq 0 $((n - 1))); do
    wait_port 127.0.0.1 "${SOCKS_PORTS[$i]}" && wait_port 127.0.0.1 "${STATS_PORTS[$i]}" || return 1
  done
}

start_haproxy() { # n balance
  local n=$1 balance=$2 i
  {
    cat <<EOF
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 3
    option redispatch 1
listen stats
    mode http
    bind 127.0.0.1:$HAPROXY_STATS_PORT
    stats enable
    stats uri /stats
frontend socks
    bind 127.0.0.1:$FRONTEND_PORT
    default_backend poolsocks
backend poolsocks
    balance $balance
    option httpchk GET /health
    http-check expect status 200
EOF
    for i in $(seq 0 $((n - 1))); do
      echo "    server s$i 127.0.0.1:${SOCKS_PORTS[$i]} send-proxy-v2 source 127.0.0.5 check port ${STATS_PORTS[$i]} inter 200ms fall 1 rise 1"
    done
  } > "$WORK/haproxy.cfg"
  timeout 600 haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
  HAPROXY_PID=$!; PIDS+=($!)
  wait_port 127.0.0.1 "$FRONTEND_PORT" || return 1
  # Every server UP by HAProxy's own health check before the load starts.
  for i in $(seq 1 100); do
    local up
    up=$(curl -s "http://127.0.0.1:$HAPROXY_STATS_PORT/stats;csv" | awk -F, '$1 == "poolsocks" && $2 ~ /^s[0-9]/ && $18 == "UP"' | wc -l)
    [ "$up" = "$n" ] && return 0
    sleep 0.1
  done
  return 1
}

measure() { # n balance round
  local n=$1 balance=$2 round=$3 label="$1x-$2" i
  say "round $round/$ROUNDS: $n instance(s), balance $balance"
  start_instances "$n" || { FAILED+=("$label: instances did not start"); stop_all; return; }
  start_haproxy "$n" "$balance" || { FAILED+=("$label: haproxy/health checks"); stop_all; return; }
  local t0 t_end json="$WORK/raw/$label-r$round.json"
  # The load generator's own view of the pool: each instance's /api/pool/stats, once a second.
  SAMPLE_ARGS=()
  for i in $(seq 0 $((n - 1))); do SAMPLE_ARGS+=(--sample-url "127.0.0.1:${STATS_PORTS[$i]}/api/pool/stats"); done
  t0=$(date +%s.%N)
  echo "$label	$round	$t0" >> "$WORK/starts.tsv"
  if ! timeout 300 "$LOADGEN" run --proxy 127.0.0.1:$FRONTEND_PORT --target "$TARGETS" --pin-targets \
      --source-base 127.0.0.10 -c "$CLIENTS" -d "$DURATION" --warmup "$WARMUP" -n 1 \
      --upstream-stats "$FAR_ADDR:8000" "${SAMPLE_ARGS[@]}" "${STRICT[@]}" --label "$label" --scenario fleet \
      --round "$round" --json "$json" >"$WORK/loadgen-$label-r$round.txt" 2>&1; then
    FAILED+=("$label round $round"); say "FAIL: $label: $(tail -3 "$WORK/loadgen-$label-r$round.txt")"
  fi
  t_end=$(python3 -c "print(f'{$t0 + $WARMUP + $DURATION:.3f}')")
  # Two more scrapes so the window's last sample is in; then ask Prometheus about the window.
  sleep 2.2
  # The measured window, at least 3 scrapes long (smoke runs measure 1 s).
  local w hits misses created sessions spread
  w="$(python3 -c "print(max(int($DURATION), 3))")s"
  # How HAProxy spread the sessions (warm-up included), by its own counters.
  spread=$(curl -s "http://127.0.0.1:$HAPROXY_STATS_PORT/stats;csv" \
    | awk -F, '$1 == "poolsocks" && $2 ~ /^s[0-9]/ {print $8}' | paste -sd/ -)
  hits="sum(increase(poolsocks_pool_hits_total[$w]))"
  misses="sum(increase(poolsocks_pool_misses_total[$w]))"
  created="sum(increase(poolsocks_pool_connections_created_total[$w]))"
  sessions="sum(increase(poolsocks_sessions_total[$w]))"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$round" \
    "$(promql "$t_end" "$hits / ($hits + $misses)")" \
    "$(promql "$t_end" "$created / $sessions")" \
    "$(promql "$t_end" "$hits + $misses")" \
    "$(promql "$t_end" "count(up{job=\"poolsocks\"} == 1)")" "$spread" >> "$WORK/promql.tsv"
  stop_all
}

stop_all() {
  local pid
  [ -n "${HAPROXY_PID:-}" ] && stop_pid "$HAPROXY_PID"; HAPROXY_PID=""
  for pid in "${INSTANCE_PIDS[@]}"; do stop_pid "$pid"; done
  INSTANCE_PIDS=()
}

: > "$WORK/promql.tsv"; : > "$WORK/starts.tsv"
for round in $(seq 1 "$ROUNDS"); do
  for n in 1 2 3; do
    for balance in leastconn source; do
      measure "$n" "$balance" "$round"
    done
  done
done

# ---------------------------------------------------------------- report
NOTES="Machine: $(nproc) cores, $(uname -r); load generator, HAProxy, Prometheus and the instances on the same machine. Run $(date -u +%Y-%m-%dT%H:%MZ). $ROUNDS round(s), best rps shown."
[ "$SMOKE" = 1 ] && NOTES+=" SMOKE run: figures are not meaningful."
python3 - "$WORK/raw" "$WORK/promql.tsv" "$WORK/starts.tsv" "$OUT/fleet.md" "$RTT" "$TOTAL_IDLE" "$PER_DEST" "$DURATION" "$WARMUP" "$NOTES" <<'EOF'
import glob, json, math, os, sys
raw, tsv, starts_tsv, out, rtt, total, per_dest, duration, warmup, notes = sys.argv[1:]
rtt = float(rtt)
starts = {}
for line in open(starts_tsv):
    label, rnd, t0 = line.rstrip("\n").split("\t")
    starts[(label, rnd)] = float(t0)
prom = {}
for line in open(tsv):
    parts = line.rstrip("\n").split("\t")
    if len(parts) == 7:
        prom[(parts[0], parts[1])] = parts[2:]
def num(text):
    try:
        v = float(text)
        return None if math.isnan(v) else v
    except (TypeError, ValueError):
        return None
runs = {}
for path in sorted(glob.glob(os.path.join(raw, "*.json"))):
    r = json.load(open(path))
    s = r.get("session_latency") or {}
    # The load generator's own count: hits and misses of every instance between its first
    # sample inside the measured window and its last one (samples carry generated_at_ms).
    measure_from_ms = (starts.get((r["label"], str(r["round"])), 0) + float(warmup)) * 1000
    by_url = {}
    for sample in r.get("stats_samples", []):
        by_url.setdefault(sample.get("sampled_url", "one"), []).append(sample)
    hits = checkouts = 0
    for samples in by_url.values():
        inside = sorted((x for x in samples if x.get("generated_at_ms", 0) >= measure_from_ms),
                        key=lambda x: x["generated_at_ms"])
        if len(inside) >= 2:
            first, last = inside[0], inside[-1]
            h = last["pool_hits"] - first["pool_hits"]
            hits += h
            checkouts += h + last["pool_misses"] - first["pool_misses"]
    own = hits / checkouts if checkouts else None
    up = r.get("upstream") or {}
    p = prom.get((r["label"], str(r["round"])), [None] * 5)
    row = dict(label=r["label"], rps=r["rps"], p50=s.get("p50_us", 0) / 1000, p99=s.get("p99_us", 0) / 1000,
               sessions=r["sessions"], errors=sum(r["errors"].values()),
               conns=(up.get("connections", 0) / r["sessions"]) if r["sessions"] else None,
               own=own, prom_hit=num(p[0]), prom_conns=num(p[1]), prom_checkouts=num(p[2]), up=num(p[3]), spread=p[4] or "n/a")
    runs.setdefault(r["label"], []).append(row)
def fmt(v, spec, suffix=""):
    return "n/a" if v is None else format(v, spec) + suffix
def pct(v):
    return fmt(None if v is None else v * 100, ".1f", "%")
lines = [
    "# fleet: 1, 2 and 3 instances behind HAProxy",
    "",
    f"16 closed-loop clients, each with its own destination (16 ports of one upstream behind a {rtt:g} ms RTT "
    f"TUN delay line) and its own source address (127.0.0.10-25), 1 request per SOCKS session, {duration} s "
    f"measured per run. HAProxy 2.6 in TCP mode sends PROXY v2 from 127.0.0.5 and health-checks each "
    f"instance's /health every 200 ms. The fleet's total max_total_idle is {total} (split evenly: "
    f"{total} / N per instance), max_idle_per_dest = {per_dest}. \"hit rate (PromQL)\" is "
    "`sum(increase(poolsocks_pool_hits_total[W])) / (sum(increase(hits[W])) + sum(increase(misses[W])))` over all "
    "instances, from a real Prometheus scraping every second, for the measured window W; \"hit rate (loadgen)\" is the "
    "load generator's own count from sampling every instance's /api/pool/stats once a second (hits and misses "
    "between its first and last sample inside the window, summed over the instances). \"upstream conns / session\" is counted by the "
    "upstream server itself (and by PromQL from the instances' connections_created).",
    "",
    notes,
    "",
    "| instances | balance | rps | p50 ms | p99 ms | hit rate (PromQL) | hit rate (loadgen) | upstream conns / session (upstream; PromQL) | sessions per instance (HAProxy) | errors |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
def order(label):
    n, balance = label.split("x-")
    return (int(n), balance)
for label in sorted(runs, key=order):
    best = max(runs[label], key=lambda r: r["rps"])
    n, balance = label.split("x-")
    lines.append(
        f"| {n} | {balance} | {best['rps']:,.0f} | {best['p50']:.1f} | {best['p99']:.1f} | "
        f"{pct(best['prom_hit'])} | {pct(best['own'])} | "
        f"{fmt(best['conns'], '.2f')}; {fmt(best['prom_conns'], '.2f')} | {best['spread']} | {best['errors']} |")
lines.append("")
lines.append("All rounds (rps / PromQL hit rate): " + "; ".join(
    f"{label}: " + ", ".join(f"{r['rps']:,.0f} / {pct(r['prom_hit'])}" for r in runs[label])
    for label in sorted(runs, key=order)))
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

say "done in $((SECONDS - START)) s; table in $OUT/fleet.md"
for s in "${SKIPPED[@]}"; do say "skipped: $s"; done
if [ ${#FAILED[@]} -gt 0 ]; then
  for f in "${FAILED[@]}"; do say "FAILED: $f"; done
  exit 1
fi
