"""Transfers with more than one process: copies on worker threads leave the loop free, two
ranks of one model, and an engine that dies in the middle of a store."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import pytest

from lmcache import protocol as p
from lmcache.client import MPClient
from lmcache.kv_transfer import register_kv_caches
from lmcache.keys import prompt_hashes
from lmcache.server.process import ServerProcess
from lmcache.testing.vllm_like import KVShape, fill, make_kv

CHUNK = 64


def hashes_for(n_chunks: int, seed: int) -> bytes:
    return prompt_hashes(random.Random(seed).choices(range(30_000), k=CHUNK * n_chunks), CHUNK)


def test_ping_and_lookup_answer_while_a_big_store_copies() -> None:
    # 256 MiB of KV: 32 layers x 64 blocks of 128 KiB pages.
    shape = KVShape(layers=32, blocks=64, block_size=16, heads=8, head_size=512)
    with ServerProcess(l1_size_gb=1, extra_args=["--chunk-size", str(CHUNK)]) as server, \
            MPClient("127.0.0.1", server.port, timeout_s=60) as client:
        kv = make_kv("LBHNC", "bfloat16", shape)
        for t in kv:
            t.fill_(1.5)
        reg = register_kv_caches(client, kv, model="big", mode="engine_driven")
        hashes = hashes_for(16, seed=1)
        big = client.submit(p.Store(reg.instance_id, hashes, list(range(64))))
        assert client.ping() == p.Pong()
        assert client.lookup(reg.scope(), hashes) in range(17)
        answered_during_copy = not big.done()
        assert big.result().stored == 16
        assert answered_during_copy, "Ping and Lookup waited for the store: copies must not block the loop"
        assert client.lookup(reg.scope(), hashes) == 16


def _rank_process(port: int, rank: int, n_chunks: int, ready: mp.Event, done: mp.Event) -> None:
    with MPClient("127.0.0.1", port, timeout_s=30) as client:
        kv = make_kv("LBNHC", "float16")
        fill(kv, "LBNHC", seed=rank)
        reg = register_kv_caches(client, kv, model="tp-model", world_size=2, rank=rank, instance_id=f"rank{rank}")
        assert reg.store(hashes_for(n_chunks, seed=7), range(4 * n_chunks)).stored == n_chunks
        ready.set()
        done.wait(60)


def test_two_ranks_a_chunk_counts_only_when_both_stored_it() -> None:
    ctx = mp.get_context("spawn")
    with ServerProcess(extra_args=["--chunk-size", str(CHUNK)]) as server:
        events = [(ctx.Event(), ctx.Event()) for _ in range(2)]
        procs = [
            ctx.Process(target=_rank_process, args=(server.port, rank, n, *events[rank]))
            for rank, n in ((0, 3), (1, 2))
        ]
        for proc in procs:
            proc.start()
        try:
            for ready, _ in events:
                assert ready.wait(120)
            with MPClient("127.0.0.1", server.port) as client:
                status = client.status()
                assert len(status["engines"]) == 2
                fmt = status["engines"][0]["page_format"]
                from lmcache.keys import CacheScope

                scope = CacheScope("tp-model", 2, 0, fmt)
                hashes = hashes_for(3, seed=7)
                assert client.lookup(scope, hashes) == 3
                assert client.lookup(scope.for_rank(1), hashes) == 2
                assert client.lookup(scope, hashes, all_ranks=True) == 2
        finally:
            for _, done in events:
                done.set()
            for proc in procs:
                proc.join(30)
        assert [proc.exitcode for proc in procs] == [0, 0]


def _store_and_die(port: int) -> None:
    client = MPClient("127.0.0.1", port, timeout_s=30)
    kv = make_kv("LBHNC", "bfloat16", KVShape(layers=16, blocks=64, heads=8, head_size=256))
    fill(kv, "LBHNC")
    reg = register_kv_caches(client, kv, model="doomed", instance_id="doomed", mode="engine_driven")
    client.submit(p.Store(reg.instance_id, hashes_for(16, seed=3), list(range(64))))
    os._exit(0)  # gone without waiting, closing or unregistering


def test_an_engine_that_dies_mid_store_leaves_whole_chunks_and_no_locks() -> None:
    ctx = mp.get_context("spawn")
    with ServerProcess(extra_args=["--chunk-size", str(CHUNK)]) as server, \
            MPClient("127.0.0.1", server.port) as client:
        proc = ctx.Process(target=_store_and_die, args=(server.port,))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 0
        deadline = time.monotonic() + 30
        while True:
            l1 = client.status()["l1"]
            if l1["writing"] == 0 and l1["objects"] in (0, 16):
                break
            assert time.monotonic() < deadline, l1
            server.wait_for_line("Stored", timeout_s=min(1.0, deadline - time.monotonic()))
        assert l1["read_locked"] == 0
        assert l1["stored"] == l1["objects"]  # every object is a completed chunk
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"lmcache_kv_{proc.pid}_")]
        assert client.ping() == p.Pong()
