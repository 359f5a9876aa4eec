#!/usr/bin/env bash
# A few seconds of each load scenario at tiny sizes, with --check: every listener must
# get packets from every speaker of its room (and only those), no participant may fail
# and nothing may be lost on loopback. Part of the test command (scripts/test.sh).
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
    --duration 3s --ramp 1s --check "$@"
}
run rooms-20x5 --rooms 2 --participants 3
# 8 > 6 participants: speaker selection is on; all 5 (town hall) or 3 speakers forwarded.
run town-hall --participants 8 --speakers 5
run big-channel --participants 8 --speakers 3
