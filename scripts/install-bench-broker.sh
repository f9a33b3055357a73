#!/usr/bin/env bash
# Installs tansu (crates.io, Apache-2.0), the independent Kafka-protocol broker that issue-level
# throughput figures are measured through (`urbanstream bench --brokers`, README "Draining a
# backlog"). It goes into target/tools/tansu (or $1); nothing outside the checkout. Building it
# takes about 25 minutes on 2 cores; does nothing when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/tools/tansu}"
version="0.6.0"
if [ -x "$dest/bin/tansu" ]; then
  exit 0
fi
command -v cargo >/dev/null 2>&1 || { echo "install-bench-broker: cargo is needed" >&2; exit 1; }
cargo install --locked --quiet --root "$dest" --version "$version" --features dynostore tansu
[ -x "$dest/bin/tansu" ]
