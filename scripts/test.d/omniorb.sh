#!/usr/bin/env bash
# The IIOP test (tests/protocols/iiop.rs) needs omniORB for Python: Debian 12
# has no python3-omniorb, so it comes from PyPI (jeteve-omniorb carries
# omniORBpy and omniidl for CPython 3.11) into a virtual environment under
# target/. Quick when already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/test-tools/omniorb
if "$venv/bin/python" -c 'import omniORB, CORBA' 2>/dev/null && [[ -x "$venv/bin/omniidl" ]]; then
  exit 0
fi
echo "scripts/test.d/omniorb.sh: installing omniORBpy into $venv"
rm -rf "$venv"
/usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check jeteve-omniorb==4.3.3.post7
