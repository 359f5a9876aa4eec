#!/usr/bin/env bash
# A few seconds of each load scenario at tiny sizes, with --check: every listener must
# get packets from every speaker of its room (and only those), no participant may fail
# and nothing may be lost on loopback; with video, every subscriber must get complete
# frames from every other camera of its room, on the top layer (or the layer its cap
# asks for, when the scenario caps subscribers), with no picture-id gap that loss does
# not explain. Part of the test command (scripts/test.sh).
#   bash benches/smoke.sh [target-dir]   (default target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release}"
LG="$BIN/chorus-loadgen"
[ -x "$LG" ] || { echo "smoke: $LG not built (cargo build --release --workspace --bins)" >&2; exit 2; }
run() {
  local scenario=$1; shift
  echo "==> loadgen smoke: $scenario $*"
  "$LG" --scenario "benches/scenarios/$scenario.toml" --server-bin "$BIN/chorus" \
    --duration "${DURATION:-3s}" --ramp 1s --check "$@"
}
run rooms-20x5 --rooms 2 --participants 3
# 8 > 6 participants: speaker selection is on; all 5 (town hall) or 3 speakers forwarded.
run town-hall --participants 8 --speakers 5
run big-channel --participants 8 --speakers 3
# Two SFU workers (rooms hashed across two threads and UDP ports): rooms on either one
# must forward.
run rooms-20x5 --rooms 4 --participants 3 --server-arg=--workers --server-arg=2
# Video (about 8 s): 3 cameras (three-layer VP8 simulcast from benches/video/*.ivf,
# turned on by a second offer) and microphones; every subscriber must get complete
# frames from both other cameras on the top layer, with continuous picture ids.
# 8 s, not 3: the allocator starts each subscriber from its start estimate and moves up
# as the estimate grows, so the top layer is reached a few seconds after a join.
DURATION=8s run video-4x5 --rooms 1 --participants 3
# The Janus comparison (about 16 s): the same tiny load against chorus dev, then Janus;
# then video on Janus alone (about 8 s): three cameras publishing VP8 simulcast, each
# subscriber asking for the substream of its cap (high / medium / low), which --check
# holds it to. Janus never gathers ICE candidates on a loopback interface, so the runs
# happen in a private network namespace with a veth address for Janus: every packet
# stays in it.
janus_run() {
  echo "==> loadgen smoke: $* (private network namespace)"
  unshare -n sh -c '
    set -e
    ip link set lo up
    ip link add v0 type veth peer name v1
    ip addr add 10.99.0.1/32 dev v0
    ip link set v1 up
    ip link set v0 up
    lg=$1; bin=$2; shift 2
    exec "$lg" --server-bin "$bin" --ramp 1s --check --janus-ip 10.99.0.1 "$@"
  ' sh "$LG" "$BIN/chorus" "$@"
}
if ! command -v janus >/dev/null; then
  echo "==> loadgen smoke: Janus runs skipped (janus not installed: apt-get install janus)"
else
  janus_run --scenario benches/scenarios/rooms-20x5.toml --duration 3s --rooms 1 \
    --participants 3 --compare-janus
  janus_run --scenario benches/scenarios/video-10x10.toml --duration 3s --participants 3 \
    --server janus
fi
