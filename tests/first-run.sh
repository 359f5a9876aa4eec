#!/usr/bin/env bash
# The first run (issue 17): the README's first command must start dev mode on a fresh
# machine with only Rust on it. This checks, in order:
#   1. the README's first command is the one that installs what the build needs
#      (`bash scripts/dev.sh`), not a bare `cargo run` that stops at the Opus build;
#   2. on a machine without cmake (this machine's PATH with cmake hidden) that command
#      names cmake and stops before building (with installing turned off: the real
#      install is what scripts/test.sh does first, through the same script);
#   3. the command, run exactly as the README gives it, starts dev mode: the web client
#      is served, /dev/token mints a token, Ctrl-C stops it.
# Run from scripts/test.sh after the release build (so step 3 starts in seconds). Step 3
# runs in a private network namespace, so it cannot clash with anything on 7880-7882.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "first-run: FAIL: $*" >&2; exit 1; }

# 1. The first ```sh block of README.md is the run command.
first_cmd=$(awk '/^```sh$/ {inblock=1; next} inblock && /^```$/ {exit} inblock {print}' README.md)
[ "$first_cmd" = "bash scripts/dev.sh" ] ||
  fail "README's first command is '$first_cmd', expected 'bash scripts/dev.sh'"
echo "first-run: README's first command: $first_cmd"

# 2. Without cmake on PATH.
hidden=$(mktemp -d)
trap 'rm -rf "$hidden"' EXIT
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  for f in "$d"/*; do
    b=$(basename "$f")
    [ "$b" = cmake ] && continue
    [ -x "$f" ] && [ ! -e "$hidden/$b" ] && ln -s "$f" "$hidden/$b"
  done
done
out=$(PATH="$hidden" bash scripts/dev.sh --check-deps 2>&1) && fail "--check-deps without cmake passed: $out"
grep -q "cmake" <<<"$out" || fail "--check-deps without cmake did not name it: $out"
set +e
out=$(PATH="$hidden" CHORUS_NO_INSTALL=1 timeout 60 bash scripts/dev.sh 2>&1)
rc=$?
set -e
[ $rc -eq 1 ] || fail "dev.sh without cmake exited $rc (expected 1 with a message): $out"
grep -q "apt-get install cmake" <<<"$out" || fail "dev.sh without cmake did not say how to install it: $out"
grep -q "Compiling" <<<"$out" && fail "dev.sh without cmake started building: $out"
echo "first-run: without cmake the command says: $(grep error <<<"$out")"

# 3. The real thing, in a private network namespace (loopback only).
log=$(mktemp)
unshare -n bash -c '
  set -e
  ip link set lo up
  '"$first_cmd"' > "'"$log"'" 2>&1 &
  pid=$!
  for _ in $(seq 1 900); do
    grep -q "Open http://127.0.0.1:7880/" "'"$log"'" && break
    kill -0 $pid 2>/dev/null || { echo "dev mode exited early"; exit 1; }
    sleep 1
  done
  grep -q "Open http://127.0.0.1:7880/" "'"$log"'" || { echo "no URL printed in 15 min"; exit 1; }
  page=$(curl -fsS http://127.0.0.1:7880/)
  grep -qi "chorus" <<<"$page" || { echo "the page at / is not the web client"; exit 1; }
  tok=$(curl -fsS -H "content-type: application/json" -d "{\"name\":\"Ana\",\"room\":\"first-run\"}" http://127.0.0.1:7880/dev/token)
  grep -q "token" <<<"$tok" || { echo "/dev/token gave: $tok"; exit 1; }
  # dev.sh execs cargo, which execs chorus on Unix: $pid is the server, as Ctrl-C finds it.
  kill -INT $pid
  for _ in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  if kill -0 $pid 2>/dev/null; then echo "did not stop within 10 s of Ctrl-C"; kill -9 $pid; exit 1; fi
' || { cat "$log" >&2; rm -f "$log"; fail "dev mode did not start and stop as the README says"; }
grep -q "Shutting down" "$log" || { cat "$log" >&2; rm -f "$log"; fail "no 'Shutting down' line after Ctrl-C"; }
echo "first-run: dev mode served the web client and a token, and stopped on Ctrl-C"
rm -f "$log"
echo "first-run: ok"
