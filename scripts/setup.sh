#!/usr/bin/env bash
# Installs what building and testing urbanstream needs beyond a Rust toolchain: a C compiler
# and make for the bundled librdkafka (rdkafka-sys builds it from source), a C++ compiler for
# libFuzzer (the fuzz targets), rustfmt/clippy, and the test broker of the real-broker tests.
# Safe to run repeatedly; does nothing when everything is there.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
# libfuzzer-sys (fuzz/) builds libFuzzer, which is C++.
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq "${need[@]}"
  else
    echo "setup: please install: ${need[*]}" >&2
    exit 1
  fi
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
# The independent Kafka-protocol broker of the real-broker tests (engine/tests/real_broker.rs);
# the tests also install it themselves when it is missing.
if command -v python3 >/dev/null 2>&1; then
  bash "$(dirname "$0")/install-test-broker.sh"
  # The S3-protocol server of the shared-checkpoint test (engine/tests/scale_out.rs).
  bash "$(dirname "$0")/install-test-s3.sh"
  # Chromium and playwright-core for the web console's browser test (engine/tests/web_console.rs).
  bash "$(dirname "$0")/install-browser.sh"
else
  echo "setup: python3 is needed for the real-broker tests' broker (noida-db from PyPI)" >&2
  exit 1
fi
