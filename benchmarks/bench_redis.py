"""The Redis tier, each figure next to its ceiling measured in the same run against the same
``redis-server`` (started here, persistence off).

- Put and get GB/s of chunk objects (1 MiB and 4 MiB) through the tier, as the L2 controller
  drives it (puts in its write batches on one connection; gets one chunk per call on its 4 read
  threads), next to ``redis-benchmark -t set,get -d <chunk bytes>`` with the same shape (puts:
  1 client pipelining one batch; gets: 4 clients, no pipeline), and gets next to plain redis-py
  GETs on as many threads. Goal: PUT_GET_GOAL below.
- Sharing: the time from a Store on server A to a Lookup on server B (same Redis) that hits,
  p50 and p99 over many chunks. Goal: SHARING_GOAL (on p99).

    pytest benchmarks/bench_redis.py --benchmark-enable
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
from figures import at_least, at_most

from lmcache.client import MPClient
from lmcache.keys import CacheScope, prompt_hashes
from lmcache.kv_transfer import register_kv_caches
from lmcache.server.process import ServerProcess
from lmcache.storage.l2 import chunk_file
from lmcache.storage.l2.controller import READ_THREADS, WRITE_BATCH_BYTES, WRITE_BATCH_CHUNKS
from lmcache.storage.l2.redis_tier import RedisTier
from lmcache.storage.l2.tier import Outgoing
from lmcache.testing.redis_servers import MISSING, REDIS_SERVER, RedisServer
from lmcache.testing.vllm_like import KVShape, make_kv

SCOPE = CacheScope("bench", 1, 0, "fmt", "")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None or shutil.which("redis-benchmark") is None, reason=MISSING)


def _redis_benchmark(port: int, nbytes: int, requests: int, clients: int, pipeline: int) -> dict[str, float]:
    """GB/s of SET and GET from redis-benchmark."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set,get", "-d", str(nbytes), "-n", str(requests),
                          "-c", str(clients), "-P", str(pipeline), "--csv", "-q"],
                         capture_output=True, text=True, check=True, timeout=600)
    rows = {r["test"]: float(r["rps"]) for r in csv.DictReader(io.StringIO(out.stdout))}
    return {test.lower(): rps * nbytes / 1e9 for test, rps in rows.items()}


PUT_GET_GOAL = at_least(0.7, "x")  # of redis-benchmark; ../shared/research/l2_tiers.md, G3


@pytest.mark.benchmark(group="l2-redis-put-get")
@pytest.mark.parametrize("mib", [1, 4])
def test_redis_tier_put_and_get_vs_redis_benchmark(benchmark, figures, mib: int) -> None:
    nbytes = mib << 20
    chunks = 8 if benchmark.disabled else 256 // mib
    batch = max(1, min(WRITE_BATCH_CHUNKS, WRITE_BATCH_BYTES // nbytes))
    payloads = [np.random.default_rng(i).integers(0, 255, nbytes, dtype=np.uint8) for i in range(4)]
    key = chunk_file.scope_id(SCOPE)
    outgoing = [Outgoing(SCOPE, key, random.Random(i).randbytes(16), 256, memoryview(payloads[i % 4]), lambda: True)
                for i in range(chunks)]
    intos = [np.empty(nbytes, dtype=np.uint8) for _ in range(READ_THREADS)]
    with tempfile.TemporaryDirectory() as d, RedisServer(Path(d)) as server:
        tier = RedisTier("redis", server.url, (), "bench", 8, 10.0, 10.0)
        deadline = time.monotonic() + 20
        while not tier.breaker.allows():
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def get(i: int) -> bool:
            into = intos[i % READ_THREADS]
            return tier.get(key, outgoing[i].chunk_hash, memoryview(into))

        def round_trip() -> tuple[float, float]:
            server.client().flushall()
            start = time.perf_counter()
            for i in range(0, chunks, batch):
                assert all(tier.put_many(outgoing[i : i + batch]))
            put_s = time.perf_counter() - start
            with ThreadPoolExecutor(READ_THREADS) as pool:
                start = time.perf_counter()
                assert all(pool.map(get, range(chunks)))
                return put_s, time.perf_counter() - start

        rounds = 1 if benchmark.disabled else 3
        timings: list[tuple[float, float]] = []
        benchmark.pedantic(lambda: timings.append(round_trip()), rounds=rounds)
        # The client's own ceiling: plain redis-py GETs of the same keys on as many threads.
        plain = redis.Redis(port=server.port, socket_read_size=1 << 20, max_connections=8)
        keys = [tier._key(key, c.chunk_hash) for c in outgoing]
        plain_s = []
        for _ in range(rounds):
            with ThreadPoolExecutor(READ_THREADS) as pool:
                start = time.perf_counter()
                assert all(pool.map(plain.get, keys))
                plain_s.append(time.perf_counter() - start)
        tier.close()
        assert np.array_equal(intos[0], payloads[0]) or np.array_equal(intos[0], payloads[(chunks - READ_THREADS) % 4])
        server.client().flushall()
        requests = max(16, chunks)
        put_ceiling = max(_redis_benchmark(server.port, nbytes, requests, 1, batch)["set"] for _ in range(rounds))
        get_ceiling = max(_redis_benchmark(server.port, nbytes, requests, READ_THREADS, 1)["get"] for _ in range(rounds))
    total = nbytes * chunks
    put, get_ = total / min(t[0] for t in timings) / 1e9, total / min(t[1] for t in timings) / 1e9
    plain_get = total / min(plain_s) / 1e9
    benchmark.extra_info.update(put_gbps=round(put, 2), get_gbps=round(get_, 2), redis_benchmark_set_gbps=round(put_ceiling, 2),
                                redis_benchmark_get_gbps=round(get_ceiling, 2), redis_py_get_gbps=round(plain_get, 2))
    # Ours also writes the header, skips keys present and checks every checksum.
    figures.record(f"redis tier put, {mib} MiB chunks", put, "GB/s", ceiling=(f"redis-benchmark SET -P {batch}", put_ceiling, "GB/s"),
                   goal=PUT_GET_GOAL)
    figures.record(f"redis tier get, {mib} MiB chunks", get_, "GB/s",
                   ceiling=(f"redis-benchmark GET -c {READ_THREADS}", get_ceiling, "GB/s"), goal=PUT_GET_GOAL)
    figures.record(f"redis tier get, {mib} MiB chunks, vs redis-py", get_, "GB/s",
                   ceiling=(f"redis-py GET x{READ_THREADS}", plain_get, "GB/s"))  # the client's own ceiling; no goal


SHARING_GOAL = at_most(1, "s")  # p99 store-to-visible; ../shared/research/l2_tiers.md, G4


@pytest.mark.benchmark(group="l2-redis-sharing")
def test_time_from_a_store_on_one_server_to_a_hit_on_another(benchmark, figures) -> None:
    samples = 5 if benchmark.disabled else 100
    shape = KVShape(layers=4, blocks=64, block_size=16, heads=8, head_size=128)
    with tempfile.TemporaryDirectory() as d, RedisServer(Path(d)) as server:
        args = ["--l2-adapter", json.dumps({"type": "redis", "url": server.url})]
        with ServerProcess(l1_size_gb=0.5, extra_args=args) as a, ServerProcess(l1_size_gb=0.5, extra_args=args) as b, \
                MPClient("127.0.0.1", a.port, timeout_s=30) as ca, MPClient("127.0.0.1", b.port, timeout_s=30) as cb:
            for status in (ca.status, cb.status):
                deadline = time.monotonic() + 20
                while status()["l2"]["tiers"][0]["state"] != "ok":
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            kv = make_kv("LBHNC", "bfloat16", shape)
            on_a = register_kv_caches(ca, kv, model="bench-redis", mode="engine_driven")
            register_kv_caches(cb, make_kv("LBHNC", "bfloat16", shape), model="bench-redis", mode="engine_driven")
            scope: CacheScope = on_a.scope()
            rng = random.Random(0)
            seconds = []
            for _ in range(samples):
                hashes = prompt_hashes(rng.choices(range(100_000), k=256), 256)
                start = time.perf_counter()
                assert on_a.store(hashes, list(range(16))).stored == 1
                while cb.lookup(scope, hashes) != 1:
                    assert time.perf_counter() - start < 30
                seconds.append(time.perf_counter() - start)
    seconds.sort()
    p50, p99 = statistics.median(seconds), seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    benchmark.extra_info.update(p50_ms=round(p50 * 1e3, 2), p99_ms=round(p99 * 1e3, 2))
    benchmark.pedantic(lambda: None, rounds=1)
    # No ceiling is measured: the figure is a latency bound, not a rate next to a bare client.
    figures.record(f"Store on A to a hit on B, p99 of {samples}", p99 * 1e3, "ms", goal=SHARING_GOAL)
