#!/usr/bin/env bash
# Installs the S3-protocol server the shared-checkpoint tests run against: moto's server
# (PyPI, Apache-2.0), which serves the S3 API (buckets, objects, listings, conditional and
# multipart puts) over HTTP from memory. It goes into target/tools/moto (or $1); nothing
# outside the checkout. Safe to run repeatedly and from several test processes at once: does
# nothing when it is there, and installs into a fresh directory that is renamed into place.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/tools/moto}"
version="5.2.5"
if [ -f "$dest/moto/server.py" ]; then
  exit 0
fi
command -v python3 >/dev/null 2>&1 || { echo "install-test-s3: python3 is needed" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d "$dest.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
  --target "$tmp" "moto[server]==$version"
# Another process may have won the race; its copy is as good as ours.
mv -T "$tmp" "$dest" 2>/dev/null || true
[ -f "$dest/moto/server.py" ]
