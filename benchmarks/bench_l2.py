"""The L2 disk tier, each figure next to its ceiling measured in the same run on the same filesystem.

- Put and get of chunk objects (4 MiB: a 256-token chunk of a small model; 32 MiB: of an 8B
  one) next to a plain Python sequential write and read of the same sizes into files of the same
  directory. Same policy on both sides: no fsync (the tier does not fsync per chunk), so both
  measure the page cache, not the device; reads follow the writes. Goal: PUT_GET_GOAL below.
- Store RPC latency with the disk tier on and off (a real server, engine_driven, 16-chunk
  stores): the write-through must not slow a Store. Goal on p50 and p99: STORE_LATENCY_GOAL.
- Restart: the index rebuilt from 100k chunk files (2k with --benchmark-disable, the figure
  scaled to 100k), next to listing the same directory (os.scandir and a stat per file). Goal:
  RESTART_GOAL.

    pytest benchmarks/bench_l2.py --benchmark-enable
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from figures import at_least, at_most

from lmcache.client import MPClient
from lmcache.keys import CacheScope, prompt_hashes
from lmcache.kv_transfer import register_kv_caches
from lmcache.server.process import ServerProcess
from lmcache.storage.l2 import chunk_file
from lmcache.storage.l2.disk import DiskTier
from lmcache.testing.vllm_like import KVShape, make_kv

SCOPE = CacheScope("bench", 1, 0, "fmt", "")


def _plain_gbps(folder: Path, payload: np.ndarray, files: int) -> tuple[float, float]:
    """Sequential write, then read, of ``files`` files of the payload with plain os calls."""
    paths = [folder / f"plain-{i}" for i in range(files)]
    data = memoryview(payload)
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.close(fd)
    write_s = time.perf_counter() - start
    into = np.empty_like(payload)
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.readv(fd, [memoryview(into)])
        os.close(fd)
    read_s = time.perf_counter() - start
    for p in paths:
        p.unlink()
    n = payload.nbytes * files
    return n / write_s / 1e9, n / read_s / 1e9


PUT_GET_GOAL = at_least(0.7, "x")  # of plain file I/O; ../shared/research/l2_tiers.md, G2


@pytest.mark.benchmark(group="l2-disk-put-get")
@pytest.mark.parametrize("mib", [4, 32])
def test_disk_tier_put_and_get_vs_plain_files(benchmark, figures, mib: int) -> None:
    files = 2 if benchmark.disabled else max(8, 512 // mib)
    payload = np.random.default_rng(0).integers(0, 255, mib << 20, dtype=np.uint8)
    with tempfile.TemporaryDirectory(dir=os.environ.get("LMCACHE_BENCH_DIR")) as d:
        folder = Path(d)
        tier = DiskTier(folder / "tier", 4 * files * payload.nbytes)
        key = chunk_file.scope_id(SCOPE)
        hashes = [random.Random(i).randbytes(16) for i in range(files)]
        into = np.empty_like(payload)

        def round_trip() -> tuple[float, float]:
            tier.clear()
            start = time.perf_counter()
            for h in hashes:
                assert tier.put(SCOPE, key, h, 256, memoryview(payload))
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            for h in hashes:
                assert tier.get(key, h, memoryview(into))
            return put_s, time.perf_counter() - start

        rounds = 1 if benchmark.disabled else 3
        timings: list[tuple[float, float]] = []
        benchmark.pedantic(lambda: timings.append(round_trip()), rounds=rounds)
        put_s, get_s = min(t[0] for t in timings), min(t[1] for t in timings)
        assert np.array_equal(into, payload)
        plain = [_plain_gbps(folder, payload, files) for _ in range(rounds)]
        plain_w, plain_r = max(w for w, _ in plain), max(r for _, r in plain)
    n = payload.nbytes * files
    put, get = n / put_s / 1e9, n / get_s / 1e9
    benchmark.extra_info.update(put_gbps=round(put, 2), get_gbps=round(get, 2), plain_write_gbps=round(plain_w, 2),
                                plain_read_gbps=round(plain_r, 2))
    # No fsync on either side; get includes the checksum check.
    figures.record(f"disk tier put, {mib} MiB chunks", put, "GB/s", ceiling=("plain write", plain_w, "GB/s"), goal=PUT_GET_GOAL)
    figures.record(f"disk tier get, {mib} MiB chunks", get, "GB/s", ceiling=("plain read", plain_r, "GB/s"), goal=PUT_GET_GOAL)


def _store_latencies(extra: list[str], rounds: int, settle: bool) -> list[float]:
    """Store latencies; with ``settle`` each store starts once the previous one's disk writes
    are done (stores between forward passes), else back to back (stores compete with the disk
    writes of the ones before for the same cores and memory bandwidth)."""
    shape = KVShape(layers=8, blocks=512, block_size=16, heads=8, head_size=128)
    with ServerProcess(l1_size_gb=1, extra_args=extra) as server, MPClient("127.0.0.1", server.port, timeout_s=60) as c:
        kv = make_kv("LBHNC", "bfloat16", shape)
        reg = register_kv_caches(c, kv, model="bench-l2", mode="engine_driven")
        rng = random.Random(0)
        blocks = list(range(16 * 16))
        out = []
        for i in range(rounds + 3):
            hashes = prompt_hashes(rng.choices(range(100_000), k=16 * 256), 256)
            start = time.perf_counter()
            assert reg.store(hashes, blocks).stored == 16
            if i >= 3:  # warm-up rounds are not counted
                out.append(time.perf_counter() - start)
            while settle and c.status()["l2"].get("queue_chunks", 0):
                time.sleep(0.001)
        return out


STORE_LATENCY_GOAL = at_most(1.1, "x")  # p50 and p99, tier on / off; ../shared/research/l2_tiers.md, G6


@pytest.mark.benchmark(group="l2-store-latency")
def test_store_latency_with_the_disk_tier_on_and_off(benchmark, figures) -> None:
    rounds = 3 if benchmark.disabled else 60

    def p99(xs: list[float]) -> float:
        return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))]

    for settle in (True, False):
        with tempfile.TemporaryDirectory(dir=os.environ.get("LMCACHE_BENCH_DIR")) as d:
            adapter = f'{{"type": "disk", "path": "{d}", "max_gb": 8}}'
            on = _store_latencies(["--l2-adapter", adapter], rounds, settle)
            off = _store_latencies([], rounds, settle)
        on50, off50 = statistics.median(on) * 1e3, statistics.median(off) * 1e3
        benchmark.extra_info[f"p50_on_off_ms_{'settled' if settle else 'back_to_back'}"] = (round(on50, 3), round(off50, 3))
        # settled: each store starts after the disk writes of the last one; else back to back.
        how = "settled" if settle else "back to back"
        figures.record(f"16-chunk Store p50 with disk tier, {how}", on50, "ms", ceiling=("tier off", off50, "ms"),
                       goal=STORE_LATENCY_GOAL)
        figures.record(f"16-chunk Store p99 with disk tier, {how}", p99(on) * 1e3, "ms",
                       ceiling=("tier off", p99(off) * 1e3, "ms"), goal=STORE_LATENCY_GOAL)
    benchmark.pedantic(lambda: None, rounds=1)


RESTART_GOAL = at_most(5, "s")  # per 100k chunk files; ../shared/research/l2_tiers.md, G1


@pytest.mark.benchmark(group="l2-restart")
def test_restart_rebuilds_the_index_from_the_directory(benchmark, figures) -> None:
    files = 2_000 if benchmark.disabled else 100_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("LMCACHE_BENCH_DIR")) as d:
        key = chunk_file.scope_id(SCOPE)
        folder = Path(d) / "lmcache-v1" / key.hex()
        folder.mkdir(parents=True)
        payload = bytes(64)
        for i in range(files):  # what a tier leaves behind (small payloads: the index never reads them)
            h = i.to_bytes(16, "little")
            (folder / f"{h.hex()}.kv").write_bytes(chunk_file.pack(256, key, h, payload) + payload)
        start = time.perf_counter()
        tier = benchmark.pedantic(DiskTier, args=(d, 1 << 40), rounds=1)
        seconds = time.perf_counter() - start
        assert tier.status()["objects"] == files
        start = time.perf_counter()
        assert sum(1 for e in os.scandir(folder) if e.stat(follow_symlinks=False).st_size) == files
        listing = time.perf_counter() - start
    per_100k = 100_000 / files
    figures.record(f"index rebuild per 100k chunk files ({files} on disk)", seconds * per_100k, "s",
                   ceiling=("scandir+stat", listing * per_100k, "s"), goal=RESTART_GOAL)
