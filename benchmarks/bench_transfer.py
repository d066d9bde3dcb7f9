"""Moving KV on the CPU, each figure next to a plain memcpy of the same bytes in the same run.

- Kernels: gather and scatter of one 32 MiB chunk (32 layers, 16 blocks of 16 tokens, 8 KV
  heads, C = 256 (K|V of head size 128), bf16), in LBNHC and LBHNC; the best of the kernel and
  of the memcpy timed in turn (goal: KERNEL_GOAL below).
- End to end: store and retrieve of 4096-token prompts of that model through a real server
  in both CPU modes; the median over rounds, next to the best memcpy (goals: END_TO_END_GOALS).

With --benchmark-disable (CI) the same code runs once, after one warm-up, on a model 8x smaller.

    pytest benchmarks/bench_transfer.py --benchmark-enable
"""

from __future__ import annotations

import random
import statistics
import time

import numpy as np
import pytest
from figures import at_least, interleaved

from lmcache.client import MPClient
from lmcache.keys import prompt_hashes
from lmcache.kv_transfer import register_kv_caches
from lmcache.server.process import ServerProcess
from lmcache.testing.vllm_like import KVShape, make_kv
from lmcache.transfer.layouts import describe
from lmcache.transfer.registered import RegisteredCache

CHUNK = 256


def model_shape(benchmark, blocks: int) -> KVShape:
    layers = 4 if benchmark.disabled else 32
    return KVShape(layers=layers, blocks=blocks, block_size=16, heads=8, head_size=256)


def memcpy_gbps(nbytes: int, rounds: int = 20) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _storage_array(storage) -> np.ndarray:
    import torch

    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


KERNEL_GOAL = at_least(0.9, "x")  # of a memcpy of the same bytes; ../shared/DESIGN.md section 9


@pytest.mark.benchmark(group="kernel-32MiB-chunk")
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("direction", ["gather", "scatter"])
def test_kernel_vs_memcpy(benchmark, figures, layout: str, direction: str) -> None:
    kv = make_kv(layout, "bfloat16", model_shape(benchmark, blocks=256))
    for t in kv:
        t.random_(0, 100)
    page_layout, storages = describe(kv)
    cache = RegisteredCache(page_layout, [_storage_array(s) for s in storages], CHUNK)
    arena = np.zeros(cache.object_bytes, dtype=np.uint8)
    blocks = np.array(random.Random(0).sample(range(256), cache.blocks_per_chunk), dtype=np.int64)
    if direction == "gather":
        run = lambda: cache.gather(blocks, arena, 0)  # noqa: E731
    else:
        cache.gather(blocks, arena, 0)
        run = lambda: cache.scatter(arena, 0, blocks)  # noqa: E731
    benchmark(run)
    src, dst = np.ones(cache.object_bytes, dtype=np.uint8), np.zeros(cache.object_bytes, dtype=np.uint8)
    times = interleaved([run, lambda: np.copyto(dst, src)], rounds=5 if benchmark.disabled else 20)
    ours, ceiling = (cache.object_bytes / min(t) / 1e9 for t in times)
    benchmark.extra_info.update(gbps=round(ours, 2), memcpy_gbps=round(ceiling, 2), ratio=round(ours / ceiling, 3))
    figures.record(f"{direction} {layout}, {cache.object_bytes >> 20} MiB chunk", ours, "GB/s", ceiling=("memcpy", ceiling, "GB/s"),
                   goal=KERNEL_GOAL)


END_TO_END_GOALS = {
    "store": (at_least(0.7, "x"), at_least(10, "GB/s", why="5x the public server's 1-2 GB/s store")),
    "retrieve": (at_least(0.7, "x"),),
}


@pytest.mark.benchmark(group="end-to-end-4096-token-prompt")
@pytest.mark.parametrize("mode", ["engine_driven", "lmcache_driven"])
@pytest.mark.parametrize("operation", ["store", "retrieve"])
def test_end_to_end(benchmark, figures, operation: str, mode: str) -> None:
    shape = model_shape(benchmark, blocks=512)
    tokens_per_prompt = 4096
    blocks_per_prompt = tokens_per_prompt // shape.block_size
    prompt_bytes = shape.layers * blocks_per_prompt * shape.heads * shape.block_size * shape.head_size * 2
    l1_gb = max(0.25, 2.5 * prompt_bytes / (1 << 30))
    with ServerProcess(l1_size_gb=l1_gb) as server, MPClient("127.0.0.1", server.port, timeout_s=120) as client:
        kv = make_kv("LBHNC", "bfloat16", shape)
        for t in kv:
            t.random_(0, 100)
        reg = register_kv_caches(client, kv, model="bench-32-layer", mode=mode)
        rng = random.Random(0)
        block_ids = rng.sample(range(shape.blocks), blocks_per_prompt)

        def fresh_prompt() -> bytes:
            return prompt_hashes(rng.choices(range(100_000), k=tokens_per_prompt), CHUNK)

        seconds: list[float] = []
        if operation == "store":
            def op() -> None:
                hashes = fresh_prompt()
                start = time.perf_counter()
                assert reg.store(hashes, block_ids).stored == tokens_per_prompt // CHUNK
                seconds.append(time.perf_counter() - start)
        else:
            hashes = fresh_prompt()
            reg.store(hashes, block_ids)
            targets = rng.sample(range(shape.blocks), blocks_per_prompt)

            def op() -> None:
                start = time.perf_counter()
                assert reg.retrieve(hashes, targets).retrieved == tokens_per_prompt // CHUNK
                seconds.append(time.perf_counter() - start)

        warmup = 1 if benchmark.disabled else 2
        if benchmark.disabled:
            op()  # pedantic runs no warm-up when disabled
        benchmark.pedantic(op, rounds=1 if benchmark.disabled else 10, warmup_rounds=0 if benchmark.disabled else warmup)
    ceiling = memcpy_gbps(prompt_bytes, rounds=5)
    ours = prompt_bytes / statistics.median(seconds[warmup:]) / 1e9
    benchmark.extra_info.update(gbps=round(ours, 2), memcpy_gbps=round(ceiling, 2), ratio=round(ours / ceiling, 3))
    figures.record(f"{mode} {operation}, 4096-token prompt ({prompt_bytes >> 20} MiB)", ours, "GB/s",
                   ceiling=("memcpy", ceiling, "GB/s"), goal=END_TO_END_GOALS[operation])
