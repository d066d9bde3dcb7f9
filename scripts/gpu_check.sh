#!/usr/bin/env bash
# The GPU checks, in one go, on a bare GPU machine with no network (one NVIDIA H100/H200, x86-64,
# Python 3.12 with torch, numba, numba-cuda, cupy, pytest, pytest-benchmark): installs what it
# lacks from wheels/ (filled beforehand by scripts/fetch_gpu_wheels.sh, which also builds our
# compiled modules for Python 3.12), builds the project, runs the GPU tests against real server
# processes and the transfer benchmark, and writes gpu_check.json and gpu_bench.json into $OUT.
# Takes 3-7 minutes (the test and benchmark steps are capped at 200 s and 150 s); exits
# non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)
TESTS=-1 BENCH=-1 INSTALL=-1
step() { echo "== $* ($(( $(date +%s) - START ))s)"; }
summary() {  # written however the script ends
    $PY - "$OUT" "$INSTALL" "$TESTS" "$BENCH" "$START" <<'PY'
import json, sys, time
out, install, tests, bench, start = sys.argv[1], *map(int, sys.argv[2:])
json.dump({"install_exit_status": install, "tests_exit_status": tests, "bench_exit_status": bench,
           "seconds": round(time.time() - start)}, open(f"{out}/gpu_check.json", "w"), indent=2)
PY
}
trap summary EXIT

step "machine"
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.csv"
$PY -c 'import sys, torch, numba, cupy; print(sys.version.split()[0], "torch", torch.__version__, "numba", numba.__version__, "cupy", cupy.__version__)'

step "install what is missing, from wheels/"
$PY -m pip install -q --no-index --find-links wheels pyzmq msgspec sanic typer prometheus_client rich Cython setuptools wheel \
    >"$OUT/install.log" 2>&1
INSTALL=$?
[ "$INSTALL" -eq 0 ] || { tail -20 "$OUT/install.log"; exit 1; }
if command -v gcc >/dev/null && $PY -m pip install -q --no-index --find-links wheels --no-build-isolation --no-deps -e . 2>"$OUT/build.log"; then
    echo "built from source"
else
    echo "no compiler (or the build failed, see build.log): using the prebuilt modules from wheels/"
    $PY -m zipfile -e "$(ls wheels/lmcache-*cp312*.whl | head -1)" "$OUT/prebuilt" >/dev/null
    cp "$OUT"/prebuilt/lmcache/_fast/*.so lmcache/_fast/
fi
export PATH="$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
$PY -c 'import lmcache._fast.hashing, lmcache._fast.pool; print("compiled modules load")' || exit 1

step "GPU tests (real server processes, CUDA IPC between processes)"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_path.py tests/test_gpu_cache_sim.py \
    tests/test_cuda_sim.py --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -25
TESTS=${PIPESTATUS[0]}

step "benchmark"
timeout 150 $PY scripts/gpu_bench.py 2>&1 | tail -40
BENCH=${PIPESTATUS[0]}

step "done"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
