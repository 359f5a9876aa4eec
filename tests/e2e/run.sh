#!/usr/bin/env bash
# Browser end-to-end tests for the web client. CI entry point.
#   CHORUS_BIN=/path/to/chorus bash tests/e2e/run.sh [test files…]
# Needs: node >= 20, npm, sox, Chromium at /usr/bin/chromium (or CHROMIUM_BIN), unshare + ip +
# nft (root; the lossy-link test drops packets with nftables in a namespace of its own).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/../.." && pwd))"
export CHORUS_BIN="${CHORUS_BIN:-$ROOT/target/release/chorus}"
export CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}"

if [ ! -x "$CHORUS_BIN" ]; then
  echo "e2e: chorus binary not found or not executable at $CHORUS_BIN" >&2
  echo "e2e: build it first (cargo build --release) or set CHORUS_BIN=/path/to/chorus" >&2
  exit 2
fi
CHORUS_BIN="$(cd "$(dirname "$CHORUS_BIN")" && pwd)/$(basename "$CHORUS_BIN")"
if [ ! -x "$CHROMIUM_BIN" ]; then
  echo "e2e: Chromium not found at $CHROMIUM_BIN (apt-get install chromium)" >&2
  exit 2
fi
for tool in node npm sox espeak-ng unshare ip nft; do
  command -v "$tool" >/dev/null || { echo "e2e: '$tool' is required" >&2; exit 2; }
done

cd "$HERE"
# playwright-core never downloads browsers on install; say so anyway.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi

# Fake microphones: 48 kHz mono 16-bit, continuous tones at -6 dBFS (Chromium loops them).
mkdir -p fixtures
[ -s fixtures/tone-a-440.wav ] || sox -n -r 48000 -c 1 -b 16 fixtures/tone-a-440.wav synth 5 sine 440 gain -6
[ -s fixtures/tone-b-880.wav ] || sox -n -r 48000 -c 1 -b 16 fixtures/tone-b-880.wav synth 5 sine 880 gain -6
[ -s fixtures/tone-c-660.wav ] || sox -n -r 48000 -c 1 -b 16 fixtures/tone-c-660.wav synth 5 sine 660 gain -6
# Digital silence, written every run (-D: no dither; sox's default dither leaves a 1-LSB
# noise that a silent microphone does not have and that keeps Opus DTX off).
sox -D -n -r 48000 -c 1 -b 16 fixtures/silence.wav trim 0 5
# Speech then silence, for the speaking indicator (Chromium loops the file).
if [ ! -s fixtures/speech-then-silence.wav ]; then
  espeak-ng -s 150 -w fixtures/speech-raw.wav "Hello everyone, can you hear me? This is a test of the speaking indicator, one two three."
  sox fixtures/speech-raw.wav -r 48000 -c 1 -b 16 fixtures/speech-then-silence.wav norm -3 pad 0 4
  rm -f fixtures/speech-raw.wav
fi

if [ "$#" -gt 0 ]; then
  TESTS=("$@")
else
  TESTS=(voice.test.mjs room.test.mjs audio.test.mjs turn.test.mjs errors.test.mjs chat.test.mjs video.test.mjs video-loss.test.mjs adaptive.test.mjs native.test.mjs)
fi

# A private network namespace with only loopback: no outside traffic, no port clashes.
# One test file at a time (each starts its own server and browsers; 2-core machines).
# node 20 applies --test-timeout to each file as a whole; every test sets its own
# timeout, and the longest file (adaptive.test.mjs, with its 3-minute soak) takes ~6 min.
exec unshare -n -- sh -c 'ip link set lo up && exec node --test --test-concurrency=1 --test-timeout=600000 "$@"' sh "${TESTS[@]}"
