#!/usr/bin/env bash
# Runs every test Chorus has: Rust unit and integration tests, TURN interop with coturn's
# client tools, and the browser end-to-end tests in Debian's Chromium.
# Installs what it needs on a fresh Debian machine (needs root or sudo for apt).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v sox >/dev/null || need_pkgs+=(sox)
command -v turnutils_uclient >/dev/null || need_pkgs+=(coturn)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v unshare >/dev/null || need_pkgs+=(util-linux)
command -v node >/dev/null || need_pkgs+=(nodejs)
command -v npm >/dev/null || need_pkgs+=(npm)
command -v cc >/dev/null || need_pkgs+=(build-essential)
command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
command -v cmake >/dev/null || need_pkgs+=(cmake)          # builds the bundled libopus
command -v espeak-ng >/dev/null || need_pkgs+=(espeak-ng)  # speech fixtures for audio tests
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "==> installing ${need_pkgs[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
fi
# coturn's package starts a turnserver on install on some systems; our tests never use it.
if command -v systemctl >/dev/null && systemctl is-active --quiet coturn 2>/dev/null; then
  systemctl stop coturn || true
fi

# One build profile for everything (release): the browser tests need a fast SFU and
# building twice would double CI time.
echo "==> cargo build --release"
cargo build --release --workspace --bins
echo "==> cargo test --release"
cargo test --release --workspace

echo "==> load generator smoke runs"
bash benches/smoke.sh target/release

echo "==> browser end-to-end tests"
CHORUS_BIN="$PWD/target/release/chorus" bash tests/e2e/run.sh
