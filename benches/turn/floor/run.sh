#!/usr/bin/env bash
# Floor CPU cost per forwarded packet of a TURN-shaped UDP relay on loopback
# (kernel UDP sockets, no TURN logic): see the doc comment in src/main.rs.
#
# Builds chorus-turn-floor (release) and runs every forwarder variant (a..e) under
# the same load as `benches/turn/run.sh 50 2000 170 1` (50 clients, 174-byte
# datagrams, ~15k forwarded pkt/s), then the no-wake-up `self` reference, and
# prints one table line each: forwarded pkt/s, client round-trip loss, and the
# forwarder's CPU microseconds per forwarded packet (user + kernel = total).
#
# Run it in a private network namespace (it uses fixed loopback ports
# FLOOR_BASE_PORT .. FLOOR_BASE_PORT+399, default 39000..39399):
#
#   unshare -n sh -c 'ip link set lo up && bash benches/turn/floor/run.sh'
#
# Env:
#   CLIENTS=50        clients (even, <= 100)
#   TICK_US=6600      each client sends one datagram per tick: 50 clients / 6.6 ms
#                     = ~7.6k msg/s = ~15.2k forwarded pkt/s, the rate uclient
#                     reaches in `benches/turn/run.sh 50 2000 170 1`
#   SECS=8            load duration per variant
#   VARIANTS="a b c d e self"
#   SELF_PKTS=500000  packets per `self` mode
#   FWD_CPU, LOAD_CPU pin the forwarder / the load to CPU lists with taskset
#                     (e.g. FWD_CPU=0 LOAD_CPU=1); `self` runs pinned like the forwarder
#   FLOOR_BASE_PORT   first port (default 39000)
#   CARGO_TARGET_DIR  default: benches/turn/floor/target (git-ignored)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CLIENTS=${CLIENTS:-50}
TICK_US=${TICK_US:-6600}
SECS=${SECS:-8}
VARIANTS=${VARIANTS:-"a b c d e self"}
SELF_PKTS=${SELF_PKTS:-500000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HERE/target}

nice -n 19 cargo build --release --locked -q --manifest-path "$HERE/Cargo.toml"
BIN=$CARGO_TARGET_DIR/release/chorus-turn-floor

PIN_F=()
PIN_L=()
[ -n "${FWD_CPU:-}" ] && PIN_F=(taskset -c "$FWD_CPU")
[ -n "${LOAD_CPU:-}" ] && PIN_L=(taskset -c "$LOAD_CPU")

kv() { # key file -> value of key=value in file
  grep -o "\b$1=[^ ]*" "$2" | head -1 | cut -d= -f2
}

echo "# $(date -u) clients=$CLIENTS tick_us=$TICK_US secs=$SECS cpus=$(nproc)" \
  "fwd_cpu=${FWD_CPU:-any} load_cpu=${LOAD_CPU:-any} loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-12s %10s %7s %8s %9s %8s %s\n' variant 'fwd pkt/s' loss 'user us' 'kernel us' 'total us' \
  'calls/pkt (recv send epoll)'

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

for v in $VARIANTS; do
  if [ "$v" = self ]; then
    "${PIN_F[@]}" "$BIN" self "$SELF_PKTS" >"$TMP/self"
    while read -r line; do
      echo "$line" >"$TMP/line"
      printf '%-12s %10s %7s %8s %9s %8s\n' "self-$(kv mode "$TMP/line")" - - \
        "$(kv user_us "$TMP/line")" "$(kv kernel_us "$TMP/line")" "$(kv total_us "$TMP/line")"
    done <"$TMP/self"
    continue
  fi
  "${PIN_F[@]}" "$BIN" fwd "$v" "$CLIENTS" >"$TMP/fwd" &
  F=$!
  sleep 0.5
  kill -0 "$F" 2>/dev/null || { wait "$F"; exit 1; }
  "${PIN_L[@]}" "$BIN" load "$CLIENTS" "$TICK_US" "$SECS" >"$TMP/load"
  wait "$F"
  [ -n "${VERBOSE:-}" ] && cat "$TMP/fwd" "$TMP/load" >&2
  printf '%-12s %10s %6s%% %8s %9s %8s %s %s %s\n' "$v" "$(kv pkt_per_s "$TMP/fwd")" \
    "$(kv loss_pct "$TMP/load")" "$(kv user_us "$TMP/fwd")" "$(kv kernel_us "$TMP/fwd")" \
    "$(kv total_us "$TMP/fwd")" "$(kv recv_calls "$TMP/fwd")" "$(kv send_calls "$TMP/fwd")" \
    "$(kv epoll_waits "$TMP/fwd")"
done
