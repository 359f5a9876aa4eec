#!/usr/bin/env bash
# Smoke test of the desktop client in a real window: starts `chorus dev` on free
# loopback ports, a headless participant (`chorus-cli`, sending a tone) and then
# `chorus-desktop` under Xvfb with Mesa's software OpenGL. The app auto-joins, sends a
# chat message, screenshots its window after a few seconds and exits; this script
# checks the PNG and that the app listed both participants and showed the message.
#
#   bash tests/desktop/smoke.sh                 # binaries from target/release
#   CHORUS_TARGET_DIR=/other/target/release bash tests/desktop/smoke.sh
#
# The screenshot goes to ${CHORUS_ARTIFACTS:-target/artifacts}/desktop-smoke.png.
# Needs: xvfb-run (Debian xvfb + xauth), Mesa (libgl1-mesa-dri, libegl1), python3.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
BIN_DIR="${CHORUS_TARGET_DIR:-target/release}"
ARTIFACTS="${CHORUS_ARTIFACTS:-target/artifacts}"
SHOT="$ARTIFACTS/desktop-smoke.png"

fail() { echo "desktop smoke: FAIL: $*" >&2; exit 1; }

for b in chorus chorus-cli chorus-desktop; do
  [ -x "$BIN_DIR/$b" ] || fail "$BIN_DIR/$b not found; build with: cargo build --release --workspace --bins (or set CHORUS_TARGET_DIR)"
done
command -v xvfb-run >/dev/null || fail "xvfb-run is required (apt-get install xvfb xauth)"
command -v python3 >/dev/null || fail "python3 is required"

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

dump_logs() {
  local f
  for f in server bot desktop.out desktop.err; do
    if [ -s "$TMP/$f.log" ]; then
      echo "----- $f log (last 60 lines) -----" >&2
      tail -n 60 "$TMP/$f.log" >&2
    fi
  done
}

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"

echo "==> desktop client smoke test (Xvfb)"
echo "==> chorus dev on $URL"
"$BIN_DIR/chorus" dev --no-turn --listen "127.0.0.1:$PORT" \
  --media-listen 127.0.0.1:0 --control-listen 127.0.0.1:0 \
  --data-dir "$TMP/data" >"$TMP/server.log" 2>&1 &
PIDS+=($!)
up=""
for _ in $(seq 1 100); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('$URL/healthz', timeout=1)" 2>/dev/null; then
    up=1
    break
  fi
  kill -0 "${PIDS[0]}" 2>/dev/null || break
  sleep 0.1
done
[ -n "$up" ] || { dump_logs; fail "server did not become healthy at $URL/healthz"; }

echo "==> headless participant 'bot' (440 Hz tone)"
"$BIN_DIR/chorus-cli" --url "$URL" --name bot --room smoke --tone 440 --duration 30s --quiet \
  >"$TMP/bot.log" 2>&1 &
PIDS+=($!)

echo "==> chorus-desktop under Xvfb"
mkdir -p "$ARTIFACTS"
rm -f "$SHOT"
MESSAGE="hello from the desktop smoke test"
set +e
# Software OpenGL: CI has no GPU. A private settings file: never touch the user's.
LIBGL_ALWAYS_SOFTWARE=1 timeout 90 xvfb-run -a -s "-screen 0 1280x800x24" \
  "$BIN_DIR/chorus-desktop" --url "$URL" --name Desk --room smoke --join \
  --settings "$TMP/desktop.toml" --say "$MESSAGE" \
  --screenshot "$SHOT" --screenshot-after 6s \
  >"$TMP/desktop.out.log" 2>"$TMP/desktop.err.log"
code=$?
set -e
cat "$TMP/desktop.out.log"
[ "$code" -eq 0 ] || { dump_logs; fail "chorus-desktop exited with $code"; }

line="$(grep '^participants:' "$TMP/desktop.out.log" || true)"
[ -n "$line" ] || { dump_logs; fail "the app printed no participants line"; }
for who in Desk bot; do
  grep -qw "$who" <<<"${line#participants:}" || { dump_logs; fail "'$who' missing from: $line"; }
done
grep -q "^chat: .*$MESSAGE" "$TMP/desktop.out.log" || { dump_logs; fail "the chat message did not come back from the server"; }

# The PNG: signature, chunk CRCs, decodable pixels, a window-sized image with real
# content (a blank or single-colour frame means nothing was drawn).
[ -s "$SHOT" ] || { dump_logs; fail "no screenshot at $SHOT"; }
python3 - "$SHOT" <<'PY' || { dump_logs; fail "$SHOT is not a valid, non-trivial PNG"; }
import struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, w = 8, b"", 0
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
    assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind}"
    if kind == b"IHDR":
        w, h, depth, color = struct.unpack(">IIBB", body[:10])
        assert depth == 8 and color in (2, 6), f"unexpected format {depth}/{color}"
        bpp = 4 if color == 6 else 3
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
raw = zlib.decompress(idat)
stride = w * bpp
assert len(raw) == h * (stride + 1), "pixel data has the wrong size"
assert w >= 600 and h >= 400, f"image too small: {w}x{h}"
# Undo the PNG row filters to count distinct colours.
prev, colours = bytearray(stride), set()
for y in range(h):
    f, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = row[i - bpp] if i >= bpp else 0
        b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
        if f == 1: row[i] = (row[i] + a) & 255
        elif f == 2: row[i] = (row[i] + b) & 255
        elif f == 3: row[i] = (row[i] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    if y % 4 == 0:
        colours.update(bytes(row[x:x + bpp]) for x in range(0, stride, bpp * 2))
    prev = row
assert len(colours) >= 16, f"only {len(colours)} colours: nothing drawn?"
print(f"png ok: {w}x{h}, {len(colours)}+ colours")
PY

echo "screenshot: $SHOT"
echo "desktop smoke: passed"
