#!/usr/bin/env bash
# Installs the peer engine that `urbanstream bench --backlog N --peer arkflow` runs beside
# urbanstream: ArkFlow (crates.io `arkflow`, Apache-2.0), a DataFusion-based stream processor
# with a Kafka input and a SQL processor. crates.io carries only its version 0.1.0; later
# versions exist only as source tags, which the registries reachable here do not serve.
# It goes into target/tools/arkflow (or $1); nothing outside the checkout but cmake, a Debian
# package its bundled librdkafka build needs. Building it takes about 30 minutes on 2 cores;
# does nothing when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/tools/arkflow}"
version="0.1.0"
if [ -x "$dest/bin/arkflow" ]; then
  exit 0
fi
command -v cargo >/dev/null 2>&1 || { echo "install-bench-peer: cargo is needed" >&2; exit 1; }
need=()
# rdkafka's `cmake-build` feature (ArkFlow's choice) builds librdkafka with cmake; its
# vendored OpenSSL and Cyrus SASL need perl and make.
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v perl >/dev/null 2>&1 || need+=(perl)
command -v make >/dev/null 2>&1 || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq "${need[@]}"
  else
    echo "install-bench-peer: please install: ${need[*]}" >&2
    exit 1
  fi
fi
# --locked: the versions ArkFlow was released with, not whatever is newest today.
cargo install --locked --quiet --root "$dest" --version "$version" arkflow
[ -x "$dest/bin/arkflow" ]
