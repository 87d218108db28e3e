#!/usr/bin/env bash
# The package test (tests/package.rs) builds the Debian package with
# cargo-deb, pinned here; installs it from crates.io when it is missing.
set -euo pipefail
version=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$version"; then
  echo "scripts/test.d/cargo-deb.sh: cargo install cargo-deb $version"
  cargo install --quiet --locked cargo-deb --version "$version"
fi
