"""A server that stalls (SIGSTOP: a GC pause, a frozen container, swapping) or restarts under
the vLLM connector's adapters, against a real server process, every byte checked.

vLLM must never wait on it longer than one ``timeout_s``, whatever number of requests arrive
meanwhile, must use it again once it answers, and, in engine_driven mode (the server copies in
and out of vLLM's own blocks), nothing the server does after the connector gave up on a request
may touch blocks vLLM was handed back.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import lmcache.integration.vllm.adapter as adapter_module
import lmcache.kv_transfer as kv_transfer_module

from engine_support import wait_until
from lmcache import protocol as p
from lmcache.config import ConnectorConfig
from lmcache.integration.vllm.adapter import LoadOp, SchedulerAdapter, StepMetadata, StoreOp, WorkerAdapter
from lmcache.server.process import ServerProcess
from lmcache.testing.vllm_like import KVShape, fill, make_kv

CHUNK, BLOCK = 32, 16
TIMEOUT_S = 0.4  # the connector's timeout_s: every test here waits out at most a few of them


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(extra_args=["--chunk-size", str(CHUNK)]) as proc:
        yield proc


@contextmanager
def paused(server: ServerProcess) -> Iterator[None]:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def config(server: ServerProcess) -> ConnectorConfig:
    return ConnectorConfig(host="tcp://127.0.0.1", port=server.port, mp_transfer_mode="engine_driven",
                           timeout_s=TIMEOUT_S, retry_interval_s=0.1, lookup_wait_ms=5)


def worker(server: ServerProcess) -> tuple[WorkerAdapter, list[torch.Tensor]]:
    kv = make_kv("LBNHC", "float16", KVShape(blocks=64))
    fill(kv, "LBNHC", seed=3)
    w = WorkerAdapter(config(server), "stalled-server", 1, 0, instance_id=f"w-{random.getrandbits(32)}")
    w.register(kv)
    # A loaded machine may take longer than TIMEOUT_S to answer a registration: try again.
    wait_until(lambda: w._try_register(on_vllm_thread=True), "the worker registers", 10)
    return w, kv


def finish(w: WorkerAdapter, req_ids: set[str], timeout_s: float) -> float:
    """Seconds until every load of ``req_ids`` was reported finished (as vLLM polls get_finished)."""
    start, done = time.monotonic(), set()
    while not req_ids <= done:
        assert time.monotonic() - start < timeout_s, f"loads still running: {req_ids - done}"
        done |= w.get_finished(set())[1]
        time.sleep(0.002)
    return time.monotonic() - start


def load(w: WorkerAdapter, req_id: str, hashes: bytes, blocks: list[int]) -> set[int]:
    w.start_load(StepMetadata(loads=[LoadOp(req_id, hashes, blocks, 0, "")]))
    finish(w, {req_id}, 10 * TIMEOUT_S)
    return w.take_load_errors()


def settle(w: WorkerAdapter, server: ServerProcess) -> None:
    """Returns once the server ran every request the worker sent before (a Fence runs after them)."""
    assert w._kv is not None
    wait_until(lambda: isinstance(w._client.call(p.Fence(w._kv.instance_id), p.Fenced, 5.0), p.Fenced),
               "the server ran the worker's earlier requests")


def test_loads_queued_behind_a_paused_server_wait_one_timeout_not_one_each(server: ServerProcess) -> None:
    w, kv = worker(server)
    try:
        hashes = os.urandom(2 * 16)
        w.save(StepMetadata(stores=[StoreOp("s", hashes, [0, 1, 2, 3], "")]))
        w.flush(5)
        n = 8
        with paused(server):
            w.start_load(StepMetadata(loads=[LoadOp(f"r{i}", hashes, [8 + 4 * i + j for j in range(4)], 0, "")
                                             for i in range(n)]))
            took = finish(w, {f"r{i}" for i in range(n)}, n * TIMEOUT_S + 5)
            assert took < 3 * TIMEOUT_S, f"{n} loads took {took:.2f}s: each waited out its own timeout"
            assert len(w.take_load_errors()) == 4 * n  # all reported failed: vLLM recomputes them
        # Once it answers again, loads come from it again, byte for byte.
        wait_until(lambda: not load(w, "again", hashes, [48, 49, 50, 51]), "loads work again", 10)
        for t in kv:
            assert torch.equal(t[48:52], t[0:4])
    finally:
        w.close()


def test_new_requests_are_not_held_back_by_a_paused_server(server: ServerProcess) -> None:
    s = SchedulerAdapter(config(server), "stalled-server", 1, BLOCK)
    try:
        wait_until(lambda: s.chunk_size() is not None, "the scheduler knows the chunk size", 10)
        prompt = [random.randrange(1000) for _ in range(4 * CHUNK)]

        def held_back(req_id: str) -> float:
            s.on_new_request(req_id, prompt)
            start = time.monotonic()
            while s.get_num_new_matched_tokens(req_id, 0)[0] is None:
                time.sleep(0.002)
            return time.monotonic() - start

        with paused(server):
            held_back("first")  # waits out its timeout: that is how the stall is found
            later = [held_back(f"later{i}") for i in range(4)]
            assert max(later) < TIMEOUT_S / 2, f"each request waited out a lookup: {later}"
        for req_id in ["first", *(f"later{i}" for i in range(4))]:
            s.request_finished(req_id)
        # Lookups go to the server again once it answers.
        wait_until(s._down.answers, "the scheduler sees the server answer again", 10)
        s.on_new_request("back", prompt)
        lookup = s._requests["back"].lookup
        assert lookup is not None and isinstance(lookup.result(), p.LookupReply)
    finally:
        s.close()


def test_a_paused_server_never_copies_into_or_out_of_blocks_vllm_got_back(server: ServerProcess) -> None:
    """engine_driven: the server copies vLLM's blocks itself. A Store or Retrieve the connector
    gave up on reaches the server when it resumes; by then vLLM has reused the store's blocks and
    recomputed (or reused) the load's. Neither copy may happen."""
    w, kv = worker(server)
    try:
        cached, late = os.urandom(2 * 16), os.urandom(2 * 16)
        w.save(StepMetadata(stores=[StoreOp("s", cached, [0, 1, 2, 3], "")]))
        w.flush(5)
        original = [t[4:8].clone() for t in kv]
        with paused(server):
            w.save(StepMetadata(stores=[StoreOp("late", late, [4, 5, 6, 7], "")], delayed_free=["late"]))
            wait_until(lambda: "late" in w.get_finished(set())[0], "the store is given up", 10 * TIMEOUT_S)
            assert load(w, "l", cached, [8, 9, 10, 11]) == {8, 9, 10, 11}
            for t in kv:  # vLLM reuses blocks 4-7 for another request and recomputes 8-11
                t[4:8] = 7
                t[8:12] = 5
        settle(w, server)
        for t in kv:
            assert bool((t[8:12] == 5).all()), "the late Retrieve wrote into blocks vLLM recomputed"
        if not load(w, "check", late, [12, 13, 14, 15]):  # a late Store may be no more than a miss
            for t, want in zip(kv, original, strict=True):
                assert not bool((t[12:16] == 7).all()), "the late Store cached another request's KV"
                assert torch.equal(t[12:16], want)
    finally:
        w.close()


def test_a_restarted_server_never_has_the_kv_cache_moved_under_vllms_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine_driven: registering again (the server restarted, or was down when vLLM started)
    moves vLLM's KV tensors into fresh SHM segments (copy, then swap). On the I/O thread, a write
    of vLLM's forward pass between the copy and the swap was lost from vLLM's own KV cache: it
    must happen on the thread that drives the steps (and writes the KV), between two steps."""
    moved_on: list[str] = []

    def recording(migrate):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            moved_on.append(threading.current_thread().name)
            return migrate(*args, **kwargs)
        return wrapper

    for module in (kv_transfer_module, adapter_module):
        if hasattr(module, "migrate_to_shm"):
            monkeypatch.setattr(module, "migrate_to_shm", recording(module.migrate_to_shm))
    first = ServerProcess(extra_args=["--chunk-size", str(CHUNK)]).start()
    w, kv = worker(first)
    try:
        first.stop(signal.SIGKILL)
        with ServerProcess(port=first.port, http_port=first.http_port, extra_args=["--chunk-size", str(CHUNK)]) as again:
            hashes = os.urandom(2 * 16)

            def stored_and_loaded() -> bool:  # one vLLM step each: a store, then a load of it
                w.save(StepMetadata(stores=[StoreOp("s", hashes, [0, 1, 2, 3], "")]))
                return not load(w, "l", hashes, [20, 21, 22, 23])

            wait_until(stored_and_loaded, f"the worker uses the restarted server on port {again.port}", 15)
        for t in kv:
            assert torch.equal(t[20:24], t[0:4])
        vllm_thread = threading.current_thread().name
        # At least the first registration and the one after the restart; more when a slow machine
        # made a registration time out and retry. Never on another thread.
        assert len(moved_on) >= 2 and set(moved_on) == {vllm_thread}, f"the KV tensors were moved on {moved_on}"
    finally:
        w.close()
        first.stop()


def serve(s: SchedulerAdapter, w: WorkerAdapter, req_id: str, prompt: list[int], blocks: list[int]) -> int:
    """One request through the scheduler and the worker, as vLLM's steps drive them: the prompt
    tokens loaded from the server (its blocks are stored, as far as they were computed)."""
    answers: list[tuple[int | None, bool]] = []
    s.on_new_request(req_id, prompt)
    wait_until(lambda: answers.append(s.get_num_new_matched_tokens(req_id, 0)) or answers[-1][0] is not None,
               "the lookup is answered", 10)
    need = answers[-1][0] or 0
    s.update_state_after_alloc(req_id, blocks, need, 0)
    step = s.build_step([(req_id, blocks, True, 0, len(prompt))], set(), set())
    w.start_load(step)
    w.save(step)
    failed = False
    if step.loads:
        finish(w, {req_id}, 10 * TIMEOUT_S)
        failed = bool(w.take_load_errors())
    w.flush(10)
    s.request_finished(req_id)
    return 0 if failed else need


def test_a_server_restarted_with_another_chunk_size_is_used_at_its_new_size() -> None:
    """The scheduler learned the chunk size from the first server; the one restarted on its port
    has another. The connector must notice and hash with the new size (else every store is
    refused and the cache is never used again until vLLM restarts), and loads stay byte-exact."""
    first = ServerProcess(extra_args=["--chunk-size", str(CHUNK)]).start()
    s = SchedulerAdapter(config(first), "stalled-server", 1, BLOCK)
    producer = SchedulerAdapter(config(first), "stalled-server", 1, BLOCK, kv_role="kv_producer")  # sends no Lookup
    w, kv = worker(first)
    try:
        wait_until(lambda: s.chunk_size() == producer.chunk_size() == CHUNK, "the schedulers know the chunk size", 10)
        first.stop(signal.SIGKILL)
        new_chunk = 2 * CHUNK
        with ServerProcess(port=first.port, http_port=first.http_port,
                           extra_args=["--chunk-size", str(new_chunk)]) as again:
            prompt = [random.randrange(1000) for _ in range(6 * new_chunk + 5)]
            loadable = 6 * new_chunk
            stored, loaded_into = list(range(0, 26)), list(range(30, 56))
            assert any(not torch.equal(t[30:54], t[0:24]) for t in kv)
            rounds = iter(range(1000))

            def hit_after_store() -> bool:
                i = next(rounds)
                serve(s, w, f"store{i}", prompt, stored)
                return serve(s, w, f"load{i}", prompt, loaded_into) == loadable

            wait_until(hit_after_store, f"a prompt stored on the restarted server (port {again.port}) is loaded", 20)
            wait_until(lambda: producer.chunk_size() == new_chunk, "a store-only scheduler learns the new size", 10)
        assert s.chunk_size() == new_chunk
        for t in kv:
            assert torch.equal(t[30:54], t[0:24])
    finally:
        w.close()
        s.close()
        producer.close()
        first.stop()
