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
command -v janus >/dev/null || need_pkgs+=(janus)            # load generator: peer comparison
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v unshare >/dev/null || need_pkgs+=(util-linux)
command -v nft >/dev/null || need_pkgs+=(nftables)          # lossy-link video test: random drops
command -v node >/dev/null || need_pkgs+=(nodejs)
command -v npm >/dev/null || need_pkgs+=(npm)
command -v espeak-ng >/dev/null || need_pkgs+=(espeak-ng)  # speech fixtures for audio tests
command -v xvfb-run >/dev/null || need_pkgs+=(xvfb)          # desktop smoke test: a virtual X display
command -v xauth >/dev/null || need_pkgs+=(xauth)            # xvfb-run needs it
command -v python3 >/dev/null || need_pkgs+=(python3)        # desktop smoke test: ports, PNG check
command -v redis-server >/dev/null || need_pkgs+=(redis-server)  # shared state tests; each starts its own
dpkg -s libasound2-dev >/dev/null 2>&1 || need_pkgs+=(libasound2-dev)     # builds cpal (desktop client)
dpkg -s libgl1-mesa-dri >/dev/null 2>&1 || need_pkgs+=(libgl1-mesa-dri)   # software OpenGL under Xvfb
dpkg -s libegl1 >/dev/null 2>&1 || need_pkgs+=(libegl1)                   # desktop window: EGL/GL loaders
dpkg -s libgl1 >/dev/null 2>&1 || need_pkgs+=(libgl1)
dpkg -s libxkbcommon-x11-0 >/dev/null 2>&1 || need_pkgs+=(libxkbcommon-x11-0)  # desktop window: X11 keyboard
dpkg -s libxcursor1 >/dev/null 2>&1 || need_pkgs+=(libxcursor1)
dpkg -s libxi6 >/dev/null 2>&1 || need_pkgs+=(libxi6)
dpkg -s libxrandr2 >/dev/null 2>&1 || need_pkgs+=(libxrandr2)
dpkg -s libx11-xcb1 >/dev/null 2>&1 || need_pkgs+=(libx11-xcb1)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "==> installing ${need_pkgs[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
fi
# What the build needs (C compiler, cmake, pkg-config) comes from the README's first
# command's own installer, so this build fails on a fresh machine if that list is short.
bash scripts/dev.sh --install-deps
# coturn's package starts a turnserver on install on some systems; our tests never use it.
# Same for janus: the comparison starts its own with a private configuration. And
# redis-server: every Redis test starts its own on a free port, without persistence.
for svc in coturn janus redis-server; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

# One build profile for everything (release): the browser tests need a fast SFU and
# building twice would double CI time.
echo "==> cargo build --release"
cargo build --release --workspace --bins
echo "==> cargo test --release"
# Redis tests skip loudly without redis-server on a developer's machine; here they must run.
CHORUS_REQUIRE_REDIS=1 cargo test --release --workspace

echo "==> first run: the README's dev command on a machine without cmake, then for real"
bash tests/first-run.sh

echo "==> load generator smoke runs"
bash benches/smoke.sh target/release

echo "==> browser end-to-end tests"
CHORUS_BIN="$PWD/target/release/chorus" bash tests/e2e/run.sh
bash tests/desktop/smoke.sh
