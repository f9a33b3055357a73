#!/usr/bin/env bash
# Installs what the web console's browser test (engine/tests/web_console.rs) needs: Debian's
# Chromium (/usr/bin/chromium) and playwright-core, pinned by tests/browser/package-lock.json,
# which drives it (the test tool never downloads a browser of its own). Safe to run
# repeatedly; does nothing when both are there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "install-browser: please install Chromium as /usr/bin/chromium" >&2
    exit 1
  fi
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "install-browser: Node.js and npm are needed for playwright-core" >&2
  exit 1
fi
if [ ! -f "$root/tests/browser/node_modules/playwright-core/package.json" ]; then
  (cd "$root/tests/browser" && npm ci --no-audit --no-fund --loglevel=error)
fi
