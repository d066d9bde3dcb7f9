"""The GPU copy path (GpuCache: both strategies, every layout) against the CPU path, byte for
byte, with Numba's CUDA simulator standing in for the GPU this machine lacks. The simulator must
be on before Numba loads, so the checks run in a child process: this file, run as a script."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np


def test_gpu_cache_matches_the_cpu_path_for_every_layout_and_strategy() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    from lmcache.transfer.gpu_cache import STRATEGIES
    from lmcache.testing.vllm_like import LAYOUTS

    checked = {tuple(line.split()[1:]) for line in out.stdout.splitlines() if line.startswith("ok ")}
    assert checked == {(layout, strategy) for layout in LAYOUTS for strategy in STRATEGIES}


def _check(layout_name: str, strategy: str) -> None:
    from lmcache.testing.simulated_gpu import SimulatedRuntime
    from lmcache.transfer.gpu_cache import GpuCache
    from lmcache.transfer.layouts import describe
    from lmcache.transfer.registered import RegisteredCache, storage_array
    from lmcache.testing.vllm_like import KVShape, fill, make_kv

    chunk = 32  # 2 blocks of 16 per chunk
    kv = make_kv(layout_name, "bfloat16", KVShape(layers=2, blocks=10, block_size=16, heads=2, head_size=8))
    fill(kv, layout_name)
    layout, storages = describe(kv)
    arrays = [storage_array(s) for s in storages]
    cpu = RegisteredCache(layout, arrays, chunk)
    size = cpu.object_bytes
    offsets = [3 * size + 64, 64, 5 * size + 64]  # out of order, as L1 hands out slots
    blocks = cpu.check_blocks(3, [5, 2, 7, 1, 9, 4])

    want = np.zeros(8 * size, dtype=np.uint8)
    for i, off in enumerate(offsets):
        cpu.gather(blocks[i], want, off)
    arena = np.zeros_like(want)
    runtime = SimulatedRuntime(arena)
    gpu = GpuCache(layout, arrays, chunk, runtime, strategy)
    event, _ = gpu.gather(blocks, offsets, wait_event=b"\x07" * 64)
    assert runtime.waited == [b"\x07" * 64] and event == 0
    assert want.any() and np.array_equal(arena, want), f"gather differs: {layout_name} {strategy}"

    # Scatter into zeroed storages, skipping the first 3 blocks, and compare with the CPU path.
    targets = cpu.check_blocks(3, [0, 3, 6, 8, 2, 5])
    got_arrays = [np.zeros_like(a) for a in arrays]
    want_arrays = [np.zeros_like(a) for a in arrays]
    cpu_back = RegisteredCache(layout, want_arrays, chunk)
    for i, off in enumerate(offsets):
        cpu_back.scatter(want, off, targets[i], max(0, 3 - i * cpu.blocks_per_chunk))
    gpu_back = GpuCache(layout, got_arrays, chunk, SimulatedRuntime(arena), strategy)
    gpu_back.scatter(offsets, targets, skip_blocks=3)
    for got, exp in zip(got_arrays, want_arrays):
        assert exp.any() and np.array_equal(got, exp), f"scatter differs: {layout_name} {strategy}"
    print("ok", layout_name, strategy, flush=True)


if __name__ == "__main__":
    from lmcache.transfer.gpu_cache import STRATEGIES
    from lmcache.testing.vllm_like import LAYOUTS

    for name in LAYOUTS:
        for strategy in STRATEGIES:
            _check(name, strategy)
