#!/usr/bin/env bash
# Runs every test of campaign-gate. On a fresh Debian/Ubuntu machine it first installs
# what the tests need (redis-server: the tests start their own on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need_apt[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "scripts/test.sh: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }

cargo test --locked --no-fail-fast "$@"
