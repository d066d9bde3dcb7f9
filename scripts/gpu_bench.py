"""GPU transfer figures, each next to its ceiling measured in the same run: a cudaMemcpyAsync
of one contiguous pinned buffer of the same size. Writes gpu_bench.json into $OUT (or the
current folder). Run by scripts/gpu_check.sh on a machine with a GPU.

Measured: GpuCache gather (store) and scatter (retrieve) of a llama-8b-shaped KV cache in vLLM's
flash-attention layout, in-process for both strategies (staging, mapped), and through a real
server process over CUDA IPC (store and retrieve as an engine sees them, until the server's
event says the copies are done).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _median(fn, repeat: int = 7) -> float:
    fn()  # warm-up (kernel compilation, first touches)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    import cupy
    import torch

    from lmcache.client import MPClient
    from lmcache.kv_transfer import register_kv_caches
    from lmcache.keys import prompt_hashes
    from lmcache.server.process import ServerProcess
    from lmcache.transfer.cuda_ipc import normalize_uuid
    from lmcache.transfer.cuda_runtime import CupyRuntime
    from lmcache.transfer.gpu_cache import STRATEGIES, GpuCache
    from lmcache.transfer.layouts import describe
    from lmcache.testing.vllm_like import KVShape, fill, make_kv

    chunk, n_chunks, layout_name = 256, 16, "flash_attn"
    shape = KVShape(layers=32, blocks=2 * n_chunks * 16 + 1, block_size=16, heads=8, head_size=128)
    kv = make_kv(layout_name, "bfloat16", shape, device="cuda")
    fill(kv, layout_name)
    layout, storages = describe(kv)
    object_bytes = layout.object_bytes(chunk)
    nbytes = n_chunks * object_bytes
    uuid = normalize_uuid(torch.cuda.get_device_properties(0).uuid)
    figures: dict[str, object] = {
        "device": torch.cuda.get_device_name(0), "layout": layout_name, "chunk_tokens": chunk,
        "object_bytes": object_bytes, "chunks": n_chunks, "bytes_per_op": nbytes,
    }

    # The ceiling: one contiguous pinned buffer, each way.
    stream = cupy.cuda.Stream(non_blocking=True)
    host = cupy.cuda.alloc_pinned_memory(nbytes)
    dev = cupy.empty(nbytes, dtype=cupy.uint8)
    rt = cupy.cuda.runtime

    def memcpy(kind: int) -> None:
        dst, src = (host.ptr, dev.data.ptr) if kind == rt.memcpyDeviceToHost else (dev.data.ptr, host.ptr)
        rt.memcpyAsync(dst, src, nbytes, kind, stream.ptr)
        stream.synchronize()

    figures["memcpy_d2h_gbps"] = nbytes / _median(lambda: memcpy(rt.memcpyDeviceToHost)) / 1e9
    figures["memcpy_h2d_gbps"] = nbytes / _median(lambda: memcpy(rt.memcpyHostToDevice)) / 1e9

    # In-process: the copy kernels and DMA alone, both strategies.
    arena = np.zeros(nbytes + object_bytes, dtype=np.uint8)
    runtime = CupyRuntime(uuid, arena)
    arrays = [cupy.asarray(torch.empty(0, dtype=torch.uint8, device="cuda").set_(s)) for s in storages]
    blocks = np.arange(1, 1 + n_chunks * 16, dtype=np.int64).reshape(n_chunks, 16)
    offsets = [i * object_bytes for i in range(n_chunks)]
    for strategy in STRATEGIES:
        cache = GpuCache(layout, arrays, chunk, runtime, strategy)
        figures[f"gather_{strategy}_gbps"] = nbytes / _median(lambda: runtime.wait_marker(cache.gather(blocks, offsets)[1])) / 1e9
        back = blocks + n_chunks * 16
        figures[f"scatter_{strategy}_gbps"] = nbytes / _median(
            lambda: runtime.wait_marker(cache.scatter(offsets, back)[1])) / 1e9
    runtime.close()

    # Through a real server over CUDA IPC, with the server's default strategy and the faster one.
    for strategy in STRATEGIES:
        with ServerProcess(l1_size_gb=4, extra_args=["--chunk-size", str(chunk), "--gpu-copy", strategy]) as server, \
                MPClient("127.0.0.1", server.port, timeout_s=60) as client:
            reg = register_kv_caches(client, kv, "bench", instance_id=f"bench-{strategy}")
            src = blocks.ravel().tolist()
            dst = (blocks + n_chunks * 16).ravel().tolist()

            def wait(event: int) -> None:
                while not reg.copied(event):
                    pass

            prompts = [prompt_hashes(random.choices(range(50_000), k=n_chunks * chunk), chunk) for _ in range(8)]

            def store() -> None:  # a fresh prompt each time (hashed beforehand): every chunk is copied
                wait(reg.store(prompts.pop(), src).event)

            figures[f"server_store_{strategy}_gbps"] = nbytes / _median(store) / 1e9
            client.clear()
            hashes = prompt_hashes(random.choices(range(50_000), k=n_chunks * chunk), chunk)
            wait(reg.store(hashes, src).event)
            deadline = time.monotonic() + 30
            while client.lookup(reg.scope(), hashes) < n_chunks and time.monotonic() < deadline:
                time.sleep(0.001)

            def retrieve() -> None:
                retrieved, event = reg.retrieve(hashes, dst)
                assert retrieved == n_chunks
                wait(event)

            figures[f"server_retrieve_{strategy}_gbps"] = nbytes / _median(retrieve) / 1e9
            ok = all(
                torch.equal(t.select(1, d).contiguous().view(torch.uint8), t.select(1, s).contiguous().view(torch.uint8))
                for t in kv for s, d in zip(src, dst)
            )
            figures[f"server_round_trip_{strategy}_byte_exact"] = ok
            reg.unregister()

    for key in [k for k in figures if k.endswith("_gbps") and not k.startswith("memcpy")]:
        ceiling = figures["memcpy_d2h_gbps"] if ("gather" in key or "store" in key) else figures["memcpy_h2d_gbps"]
        figures[key.replace("_gbps", "_vs_memcpy")] = round(figures[key] / ceiling, 3)
    out = Path(os.environ.get("OUT") or ".") / "gpu_bench.json"
    out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0 if all(v for k, v in figures.items() if k.endswith("byte_exact")) else 1


if __name__ == "__main__":
    sys.exit(main())
