#!/usr/bin/env bash
# The source archive a release would publish builds, installs into a clean venv (compiling the
# Cython modules there) and imports: what `pip install lmcache-<version>.tar.gz` does for a user.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build --sdist --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
python3.11 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/dist/lmcache-*.tar.gz > "$work/install.log" 2>&1 || { cat "$work/install.log"; exit 1; }
cd "$work"  # away from the checkout, so the installed package is the one imported
"$work/venv/bin/python" -c "
import lmcache._fast.hashing, lmcache._fast.pool, lmcache.server.app, lmcache.kv_transfer, lmcache.client
assert lmcache.client.__file__.startswith('$work/venv'), lmcache.client.__file__
"
"$work/venv/bin/lmcache" --help > /dev/null
echo "sdist: $(basename "$work"/dist/lmcache-*.tar.gz) builds, installs and imports in a clean venv"
