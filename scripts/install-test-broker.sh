#!/usr/bin/env bash
# Installs the independent Kafka-protocol broker the real-broker tests run against:
# noida-db (PyPI, MIT), a single binary whose Kafka service implements transactions
# (InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit, EndTxn),
# read_committed fetches, consumer groups with static membership, CreateTopics and
# DeleteRecords. It goes into target/tools/noida-db (or $1); nothing outside the checkout.
# Safe to run repeatedly and from several test processes at once: does nothing when it is
# there, and installs into a fresh directory that is renamed into place.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/tools/noida-db}"
version="0.2.3"
if [ -x "$dest/noida_db/noida-db" ]; then
  exit 0
fi
command -v python3 >/dev/null 2>&1 || { echo "install-test-broker: python3 is needed" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d "$dest.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
  --target "$tmp" "noida-db==$version"
chmod +x "$tmp/noida_db/noida-db"
# Another process may have won the race; its copy is as good as ours.
mv -T "$tmp" "$dest" 2>/dev/null || true
[ -x "$dest/noida_db/noida-db" ]
