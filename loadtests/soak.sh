#!/usr/bin/env bash
# Soak: mixed traffic with faults injected for a while (default 600 s), then checks that the
# daemon is back where it started: open fds and RSS near their level before, nothing in use or
# pending, idle spares equal to the connections the upstreams really hold. Not part of CI.
#
#   bash loadtests/soak.sh [SECONDS]        writes loadtests/results/soak.md
#
# Faults: one of ten upstream servers is killed and restarted every 30 s (resets mid-transfer,
# spares closed while idle, refused connects while it is down), a refused destination is in
# the mix, and a hostile client sends garbage, truncated and silent handshakes all along.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${1:-600}
T="${CARGO_TARGET_DIR:-$ROOT/target}/release"
(cd "$ROOT" && cargo build --release -q -p poolsocks -p loadgen --bins)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
say() { printf '[soak %4ss] %s\n' "$SECONDS" "$*" >&2; }

declare -A UP
start_upstream() { "$T/loadgen" upstream --listen "127.0.0.1:$1" --duration $((DURATION + 300)) >/dev/null 2>&1 & UP[$1]=$!; PIDS+=("$!"); }
for port in $(seq 15000 15009); do start_upstream "$port"; done

"$T/poolsocks" --config "$ROOT/loadtests/configs/soak.toml" 2>"/tmp/poolsocks-soak.log" &
DAEMON=$!; PIDS+=("$DAEMON")
for _ in $(seq 100); do curl -sf http://127.0.0.1:14211/health >/dev/null && break; sleep 0.1; done
stats() { curl -sf http://127.0.0.1:14211/api/pool/stats; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
fds() { ls "/proc/$DAEMON/fd" | wc -l; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$DAEMON/status"; }
held_upstream() { ss -Htn state established '( sport >= :15000 and sport <= :15009 )' | wc -l; }
quiet() { # until nothing is in use or pending (bounded)
  for _ in $(seq 300); do
    s=$(stats); [ "$(echo "$s" | field "['connections_in_use']")" = 0 ] && [ "$(echo "$s" | field "['pending_creates']")" = 0 ] && return 0; sleep 0.1
  done; return 1; }

# Warm up (allocator, runtime threads), let spares expire, then take the "before" figures.
"$T/loadgen" run --proxy 127.0.0.1:14201 --target 127.0.0.1:15000-15009 -c 16 -d 5 >/dev/null 2>&1
sleep 8; quiet
FDS0=$(fds); RSS0=$(rss); say "before: fds $FDS0, rss ${RSS0} KiB"

# The hostile client: a garbage, truncated or silent handshake every 20 ms.
(
  end=$((SECONDS + DURATION))
  while [ $SECONDS -lt $end ]; do
    case $((RANDOM % 4)) in
      0) head -c $((RANDOM % 300 + 1)) /dev/urandom ;;
      1) printf '\x05\x01\x00\x05\x01\x00\x03\xff\x61\x62' ;;
      2) printf '\x04\x01\x00\x50\x7f\x00\x00\x01\x00' ;;
      3) : ;;
    esac | timeout 2 bash -c 'cat > /dev/tcp/127.0.0.1/14201' 2>/dev/null || true
    sleep 0.02
  done
) & PIDS+=("$!")

# The fault injector: kill and restart one upstream every 30 s.
(
  end=$((SECONDS + DURATION - 30))
  while [ $SECONDS -lt $end ]; do
    sleep 30
    port=$((15000 + RANDOM % 10))
    pkill -f "upstream --listen 127.0.0.1:$port" || true
    sleep 2
    "$T/loadgen" upstream --listen "127.0.0.1:$port" --duration $((DURATION + 300)) >/dev/null 2>&1 &
  done
) & PIDS+=("$!")

# The load: 32 clients over ten destinations plus a refused one, 1-3 requests per session.
CLOSED=127.0.0.1:15999
say "soaking for $DURATION s"
"$T/loadgen" run --proxy 127.0.0.1:14201 --target "127.0.0.1:15000-15009,$CLOSED" -c 32 -d "$DURATION" \
  --session-timeout 5 --json /tmp/soak-load.json 2>/tmp/soak-progress.log | tee /tmp/soak-load.txt >&2 || true

say "load done; letting spares expire and checking the books"
sleep 10; quiet || say "WARNING: still in use or pending"
S=$(stats)
FDS1=$(fds); RSS1=$(rss)
IDLE=$(echo "$S" | field "['total_idle']"); HELD=$(held_upstream)
INUSE=$(echo "$S" | field "['connections_in_use']"); PENDING=$(echo "$S" | field "['pending_creates']")
mkdir -p "$ROOT/loadtests/results"
{
  echo "# soak"
  echo
  echo "$DURATION s of mixed traffic (32 clients over 10 destinations + 1 refused, pool on with"
  echo "small limits, idle timeout 5 s), one upstream killed and restarted every 30 s, a hostile"
  echo "client throughout. Run $(date -u +%FT%RZ)."
  echo
  echo '```'
  cat /tmp/soak-load.txt
  echo '```'
  echo
  echo "| figure | before | after |"
  echo "|---|---|---|"
  echo "| open fds of the daemon | $FDS0 | $FDS1 |"
  echo "| RSS (KiB) | $RSS0 | $RSS1 |"
  echo "| connections in use | 0 | $INUSE |"
  echo "| pending creates | 0 | $PENDING |"
  echo "| idle spares (pool) vs connections upstreams hold | | $IDLE vs $HELD |"
  echo
  echo "Pool counters after: $(echo "$S" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(", ".join(f"{k} {s[k]}" for k in ["total_created","pool_hits","pool_misses","evicted","expired","connect_failures","validation_drops","peer_closed","manager_restarts","fallback_dials"] if k in s))')"
} > "$ROOT/loadtests/results/soak.md"
cat "$ROOT/loadtests/results/soak.md"
[ "$INUSE" = 0 ] && [ "$PENDING" = 0 ] && [ "$IDLE" = "$HELD" ]
