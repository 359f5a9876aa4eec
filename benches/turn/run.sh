#!/usr/bin/env bash
# Chorus TURN vs coturn `turnserver` under identical turnutils_uclient load on loopback.
#
# For each server: start it, run turnutils_uclient in client-to-client mode (-y)
# through it, then report relayed packets/s, loss, and server CPU seconds per
# relayed packet (utime+stime from /proc/PID/stat, also split into user and kernel).
#
# Usage: benches/turn/run.sh [clients] [messages-per-client] [msg-length] [interval-ms]
# Env:   CHORUS_TURN_BIN  command that starts our relay with `chorus turn` flags
#                         (default: `target/release/chorus turn`, built if missing)
#        TRANSPORT=tcp    run the load over TCP instead of UDP
set -euo pipefail

CLIENTS=${1:-50}
MSGS=${2:-2000}
LEN=${3:-170}
INTERVAL=${4:-5}
SECRET=bench-secret
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$HERE/results-$(date -u +%Y%m%dT%H%M%SZ).txt}
TFLAG=""
[ "${TRANSPORT:-udp}" = tcp ] && TFLAG="-t"

for t in turnutils_uclient turnserver; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install coturn)"; exit 1; }
done

if [ -z "${CHORUS_TURN_BIN:-}" ]; then
  [ -x "$TARGET/release/chorus" ] || (cd "$ROOT" && cargo build --release -q --bin chorus)
  CHORUS_TURN_BIN="$TARGET/release/chorus turn"
fi

CLK_TCK=$(getconf CLK_TCK)
cpu_secs() { # "utime stime" of a pid, in seconds
  awk -v t="$CLK_TCK" '{ print $14 / t, $15 / t }' "/proc/$1/stat"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_load() { # name pid port
  local name=$1 pid=$2 port=$3 cpu0 cpu1 log
  sleep 1
  cpu0=$(cpu_secs "$pid")
  log=$(mktemp)
  local t0 t1
  t0=$(date +%s.%N)
  turnutils_uclient $TFLAG -c -y -u bench -W "$SECRET" -m "$CLIENTS" -n "$MSGS" -l "$LEN" -z "$INTERVAL" \
    -p "$port" 127.0.0.1 >"$log" 2>&1 || true
  t1=$(date +%s.%N)
  cpu1=$(cpu_secs "$pid")
  local recv lost pct
  recv=$(grep -o 'tot_recv_msgs=[0-9]*' "$log" | tail -1 | cut -d= -f2)
  lost=$(grep 'Total lost packets' "$log" | tail -1 | sed -E 's/.*Total lost packets ([0-9]+) \(([0-9.]+)%.*/\1 \2/')
  recv=${recv:-0}
  # Client-to-client: every received message crossed the relay twice
  # (client A -> relay A -> relay B -> client B), i.e. 2 relayed packets.
  python3 - "$name" "$recv" "$lost" "$t0" "$t1" "$cpu0" "$cpu1" <<'EOF' | tee -a "$OUT"
import sys
name, recv, lost, t0, t1, c0, c1 = sys.argv[1:]
recv = int(recv); dt = float(t1) - float(t0)
(u0, s0), (u1, s1) = [map(float, c.split()) for c in (c0, c1)]
user, sys_ = u1 - u0, s1 - s0
cpu = user + sys_
relayed = 2 * recv
n, pct = (lost.split() + ["?", "?"])[:2]
us = lambda x: x / relayed * 1e6 if relayed else float("nan")
print(f"{name:8} recv={recv:8d} relayed_pkts={relayed:8d} wall={dt:6.2f}s "
      f"relayed/s={relayed/dt:9.0f} lost={n} ({pct}%) server_cpu={cpu:6.2f}s "
      f"cpu_per_relayed_pkt={us(cpu):6.2f}us (user {us(user):.2f} + kernel {us(sys_):.2f})")
EOF
  rm -f "$log"
}

echo "# $(date -u) clients=$CLIENTS msgs=$MSGS len=$LEN interval=${INTERVAL}ms transport=${TRANSPORT:-udp} cpus=$(nproc)" | tee -a "$OUT"

# --- ours ---
P=$(free_port)
$CHORUS_TURN_BIN --listen "127.0.0.1:$P" --auth-secret "$SECRET" --allow-loopback-peers \
  --min-port 40000 --max-port 44999 >/dev/null 2>&1 &
OURS=$!
trap 'kill $OURS 2>/dev/null || true; kill ${COTURN:-} 2>/dev/null || true' EXIT
run_load chorus "$OURS" "$P"
kill "$OURS"; wait "$OURS" 2>/dev/null || true

# --- coturn ---
P=$(free_port)
turnserver -n --no-cli --no-tls --no-dtls --listening-ip 127.0.0.1 --listening-port "$P" \
  --relay-ip 127.0.0.1 --min-port 45000 --max-port 49999 --allow-loopback-peers \
  --use-auth-secret --static-auth-secret "$SECRET" --realm chorus --no-stdout-log \
  --log-file /dev/null --pidfile /tmp/turnserver-bench-$$.pid >/dev/null 2>&1 &
COTURN=$!
run_load coturn "$COTURN" "$P"
kill "$COTURN"; wait "$COTURN" 2>/dev/null || true
echo "results appended to $OUT"
