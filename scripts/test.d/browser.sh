#!/usr/bin/env bash
# The dashboard browser test (tests/dashboard.rs) drives chromium (from
# scripts/test-deps.txt) with playwright-core from npm, pinned by
# tests/browser/package-lock.json. Installs npm if node came without it, then
# the pinned packages when they are missing or older than the lock file.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v npm >/dev/null; then
  echo "scripts/test.d/browser.sh: installing npm"
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

dir=tests/browser
if [[ ! -d $dir/node_modules/playwright-core || $dir/package-lock.json -nt $dir/node_modules/.package-lock.json ]]; then
  echo "scripts/test.d/browser.sh: npm ci in $dir"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
