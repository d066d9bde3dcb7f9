#!/usr/bin/env bash
# Fills wheels/ (ignored by git) with what scripts/gpu_check.sh installs on a GPU machine that has
# no network: our runtime dependencies and the build tools as Python 3.12 x86-64 wheels, and a
# wheel of lmcache built here with Python 3.12 (its compiled modules, for a machine without gcc).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
PY312="${PY312:-}"
if [ -z "$PY312" ]; then
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$candidate; break; fi
    done
fi
[ -n "$PY312" ] || { echo "needs Python 3.12 here to build lmcache's compiled modules (set PY312)"; exit 1; }
python3 -m pip download -q --dest wheels --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any pyzmq msgspec sanic typer prometheus_client rich Cython setuptools wheel
$PY312 -m pip wheel -q --no-deps --wheel-dir wheels .
du -sh wheels
