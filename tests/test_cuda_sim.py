"""The CUDA page-copy kernel agrees with the njit kernel on every layout, under Numba's CUDA
simulator (a fake for the GPU this machine lacks). The simulator must be switched on before
Numba loads, so the comparison runs in a child process: this file, run as a script."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np


def test_cuda_kernel_matches_njit_on_every_layout() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    checked = [line for line in out.stdout.splitlines() if line.startswith("ok ")]
    from lmcache.testing.vllm_like import LAYOUTS

    assert sorted(line.split()[1] for line in checked) == sorted(LAYOUTS)


def _storage_array(storage) -> np.ndarray:
    import torch

    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


def _compare_layout(layout_name: str) -> None:
    from lmcache._fast.kernels import copy_pages, cuda_copy_pages
    from lmcache.transfer.layouts import describe
    from lmcache.testing.vllm_like import KVShape, fill, make_kv

    kv = make_kv(layout_name, "bfloat16", KVShape(layers=2, blocks=8, block_size=16, heads=2, head_size=8))
    fill(kv, layout_name)
    layout, storages = describe(kv)
    arrays = [_storage_array(s) for s in storages]
    blocks = np.array([5, 2, 7], dtype=np.int64)
    pages = layout.page_offsets(blocks)
    object_pages = np.arange(pages.size, dtype=np.int64).reshape(pages.shape) * layout.page_bytes + 128
    arena_cpu = np.zeros(pages.size * layout.page_bytes + 128, dtype=np.uint8)
    arena_gpu = arena_cpu.copy()
    for s, array in enumerate(arrays):
        rows = [i for i, layer in enumerate(layout.layers) if layer.storage == s]
        copy_pages(array, pages[rows].ravel(), arena_cpu, object_pages[rows].ravel(), layout.page_bytes)
        cuda_copy_pages(array, pages[rows].ravel(), arena_gpu, object_pages[rows].ravel(), layout.page_bytes, threads=32)
    assert arena_cpu[128:].any(), "nothing was gathered"
    assert np.array_equal(arena_cpu, arena_gpu), f"gather differs for {layout_name}"
    # scatter back into zeroed copies of the storages, into other blocks
    targets = np.array([0, 1, 3], dtype=np.int64)
    back_pages = layout.page_offsets(targets)
    for s, array in enumerate(arrays):
        rows = [i for i, layer in enumerate(layout.layers) if layer.storage == s]
        cpu, gpu = np.zeros_like(array), np.zeros_like(array)
        copy_pages(arena_cpu, object_pages[rows].ravel(), cpu, back_pages[rows].ravel(), layout.page_bytes)
        cuda_copy_pages(arena_cpu, object_pages[rows].ravel(), gpu, back_pages[rows].ravel(), layout.page_bytes, threads=32)
        assert cpu.any() and np.array_equal(cpu, gpu), f"scatter differs for {layout_name}"
    print("ok", layout_name, flush=True)


if __name__ == "__main__":
    from lmcache.testing.vllm_like import LAYOUTS

    for name in LAYOUTS:
        _compare_layout(name)
