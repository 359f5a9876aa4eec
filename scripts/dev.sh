#!/usr/bin/env bash
# Starts Chorus in dev mode on this machine (signaling + SFU + TURN on loopback) — the
# README's first command. On a fresh Debian or Ubuntu machine with only the Rust
# toolchain it first installs what the build needs (a C compiler, cmake for the bundled
# libopus, pkg-config) with apt, saying so; then builds and runs `chorus dev`.
#
#   bash scripts/dev.sh                 # build (release) and start dev mode
#   bash scripts/dev.sh --lan           # any `chorus dev` flag is passed on
#   bash scripts/dev.sh --install-deps  # only install the build dependencies
#   bash scripts/dev.sh --check-deps    # only list what is missing (exit 1 if anything)
#
# CHORUS_NO_INSTALL=1 never runs apt (prints what to install instead and stops).
set -euo pipefail
cd "$(dirname "$0")/.."

# What building the `chorus` binary needs beyond Rust. Each entry: a command that must
# be on PATH, and the Debian package that brings it.
BUILD_DEPS=(
  "cc:build-essential"   # C compiler and linker: libopus, SQLite, ring/aws-lc
  "cmake:cmake"          # the Opus crate builds its bundled libopus with CMake
  "pkg-config:pkg-config"
)

missing_pkgs() {
  local dep cmd pkg
  for dep in "${BUILD_DEPS[@]}"; do
    cmd="${dep%%:*}"
    pkg="${dep#*:}"
    command -v "$cmd" >/dev/null 2>&1 || echo "$pkg"
  done
}

install_deps() {
  local pkgs
  mapfile -t pkgs < <(missing_pkgs)
  [ ${#pkgs[@]} -eq 0 ] && return 0
  echo "==> the build needs: ${pkgs[*]} (not on this machine)" >&2
  if [ "${CHORUS_NO_INSTALL:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: install them with your package manager (Debian/Ubuntu: apt-get install ${pkgs[*]}), then run this again" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "error: installing ${pkgs[*]} needs root; run as root, or: su -c 'apt-get install ${pkgs[*]}'" >&2
      exit 1
    fi
    sudo="sudo"
  fi
  echo "==> installing ${pkgs[*]} with apt-get${sudo:+ (sudo may ask for your password)}" >&2
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
  mapfile -t pkgs < <(missing_pkgs)
  if [ ${#pkgs[@]} -gt 0 ]; then
    echo "error: still missing after apt-get: ${pkgs[*]}" >&2
    exit 1
  fi
}

case "${1:-}" in
  --check-deps)
    mapfile -t pkgs < <(missing_pkgs)
    if [ ${#pkgs[@]} -gt 0 ]; then
      echo "missing: ${pkgs[*]}"
      exit 1
    fi
    echo "build dependencies: all present"
    exit 0
    ;;
  --install-deps)
    install_deps
    exit 0
    ;;
esac

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not on PATH: install Rust first (https://rustup.rs), then run this again" >&2
  exit 1
fi
install_deps
if [ ! -x target/release/chorus ]; then
  echo "==> first build (release, a few minutes on a laptop); later starts take seconds" >&2
fi
exec cargo run --release --bin chorus -- dev "$@"
