"""Engines that stall or die at the worst moment, against a real server, every byte checked.

A stalled engine (GC pause, SIGSTOP, a frozen container) looks like a dead one to a timer, but
it still holds raw arena offsets in lmcache_driven mode. These tests stop real engine processes
inside their copies (each engine stops itself at the exact point, then the test decides when it
goes on or dies), push every slot of a small L1 through reuse meanwhile, and check that nobody
ever reads or keeps a wrong byte, that memory comes back, and that /dev/shm is left clean.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_support import (
    BPC, CHUNK, CHUNK_BYTES, TTL, Truth, chunk_hashes, chunks_match, fill_chunks, process_state, shm_files, spawn,
    wait_until,
)
from lmcache import protocol as p
from lmcache.client import MPClient, ServerError, ServerUnavailableError
from lmcache.kv_transfer import register_kv_caches
from lmcache.keys import HASH_BYTES
from lmcache.server.process import ServerProcess
from lmcache.testing.vllm_like import make_kv

# --- the engine processes (spawned; each stops itself where the test needs it) ------------------


def _stalling_engine(port: int, action: str, hashes: bytes, conn) -> None:
    """Registers in lmcache_driven mode, then stores or retrieves ``hashes``, stopping itself
    (SIGSTOP) right before its first page copy, with the arena offsets in hand."""
    client = MPClient("127.0.0.1", port, timeout_s=60)
    kv = make_kv("LBHNC", "float16")
    reg = register_kv_caches(client, kv, model="m", instance_id=f"stall-{os.getpid()}", mode="lmcache_driven")
    cache = reg.cache
    copy = cache.gather if action == "store" else cache.scatter

    paused = []

    def pause_then_copy(*args, **kwargs):
        if not paused:  # once, before the first chunk's copy
            paused.append(True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return copy(*args, **kwargs)

    blocks = list(range(len(hashes) // HASH_BYTES * BPC))
    if action == "store":
        fill_chunks(kv, hashes, blocks)
        cache.gather = pause_then_copy
        conn.send(("done", reg.store(hashes, blocks).stored, True))
    else:
        cache.scatter = pause_then_copy
        try:
            written = reg.retrieve(hashes, blocks).retrieved
        except ServerError as e:
            # If the server's housekeeping dropped the expired ticket before the late
            # FinishRetrieve arrived, the load fails with this error instead of returning 0
            # (which of the two depends on the sweep's timing): either way nothing was loaded.
            if "expired retrieve ticket" not in e.message:
                raise
            written = 0
        conn.send(("done", written, chunks_match(kv, hashes[: written * HASH_BYTES], blocks)))
    client.close()


def _dies_while_registering(port: int, mode: str) -> None:
    """Killed after its KV segments exist and before the server answered its registration."""
    client = MPClient("127.0.0.1", port, timeout_s=60)
    real_call = client.call

    def call(request, expect, timeout=None):
        if isinstance(request, p.RegisterKVCache):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_call(request, expect, timeout)

    client.call = call
    register_kv_caches(client, make_kv("LBHNC", "float16"), model="m", mode=mode)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    # About 1 MiB of L1: 4 KiB chunks, so a few hundred stores recycle every slot. LRU: a flood of
    # new chunks must push out chunks that were read (the default 2Q-LONG rightly keeps those).
    with ServerProcess(l1_size_gb=1 / 1024,
                       extra_args=["--chunk-size", str(CHUNK), "--lock-ttl", TTL, "--eviction-policy", "LRU"]) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[MPClient]:
    with MPClient("127.0.0.1", server.port, timeout_s=30) as c:
        yield c


# --- the tests ----------------------------------------------------------------------------------


def test_a_paused_writer_never_corrupts_another_chunk(server: ServerProcess, client: MPClient) -> None:
    truth = Truth(client)
    mine = chunk_hashes(2, seed=1)
    proc, conn = spawn(_stalling_engine, server.port, "store", mine)
    try:
        wait_until(lambda: process_state(proc.pid) == "T", "the writer stopped inside its copy")
        wait_until(lambda: client.status()["l1"]["orphans"] == 2, "its write locks expired")
        truth.flood(rounds=80, seed=2)  # 640 chunks through a ~256-slot L1
        os.kill(proc.pid, signal.SIGCONT)  # it now writes its bytes at the offsets it was given
        assert conn.poll(60)
        _, stored, _ = conn.recv()
        assert stored == 0, "a commit after the lock expired must publish nothing"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.join(30)
    assert truth.check_all() > 100
    l1 = client.status()["l1"]
    assert l1["orphans"] == 0 and l1["writing"] == 0 and l1["read_locked"] == 0
    assert client.lookup(truth.reg.scope(), mine) == 0


def test_a_paused_reader_reports_its_load_failed(server: ServerProcess, client: MPClient) -> None:
    truth = Truth(client)
    wanted = chunk_hashes(2, seed=3)
    truth.store(wanted)
    proc, conn = spawn(_stalling_engine, server.port, "retrieve", wanted)
    try:
        wait_until(lambda: process_state(proc.pid) == "T", "the reader stopped inside its copy")
        wait_until(lambda: client.status()["l1"]["read_locked"] == 0, "its read locks expired")
        truth.flood(rounds=80, seed=4)
        assert client.lookup(truth.reg.scope(), wanted) == 0, "the chunks it reads were evicted and their slots reused"
        os.kill(proc.pid, signal.SIGCONT)  # it now copies whatever those slots hold
        assert conn.poll(60)
        _, written, exact = conn.recv()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.join(30)
    assert written == 0, "a load whose locks expired under it must not count as loaded"
    assert exact  # trivially: nothing counts as loaded
    assert client.status()["l1"]["read_locked"] == 0


def test_a_writer_that_dies_paused_gives_its_slots_back(server: ServerProcess, client: MPClient) -> None:
    mine = chunk_hashes(3, seed=5)
    proc, conn = spawn(_stalling_engine, server.port, "store", mine)
    wait_until(lambda: process_state(proc.pid) == "T", "the writer stopped inside its copy")
    wait_until(lambda: client.status()["l1"]["orphans"] == 3, "its write locks expired")
    assert client.status()["tickets"]["open"] == 1  # alive: its slots are kept
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    # The server's housekeeping sees the engine's liveness lock free, then frees its slots.
    wait_until(lambda: client.status()["l1"]["orphans"] == 0, "the dead writer's slots were freed")
    status = client.status()
    assert status["tickets"]["open"] == 0
    assert status["l1"]["used_bytes"] == status["l1"]["objects"] * CHUNK_BYTES
    wait_until(lambda: not shm_files(proc.pid), "its liveness mark was removed")


@pytest.mark.parametrize("mode", ["engine_driven", "lmcache_driven"])
def test_an_engine_killed_while_registering_leaves_nothing_in_dev_shm(
    server: ServerProcess, client: MPClient, mode: str
) -> None:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_dies_while_registering, args=(server.port, mode), daemon=True)
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    if mode == "engine_driven":
        assert any(n.startswith(f"lmcache_kv_{proc.pid}_") for n in os.listdir("/dev/shm")), "nothing to clean up?"
    wait_until(lambda: not shm_files(proc.pid), f"the dead engine's files are gone ({shm_files(proc.pid)})")
    assert client.ping() == p.Pong()


def _sparse_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.ftruncate(fd, size)
    os.close(fd)


def test_a_segment_name_that_is_not_a_plain_segment_is_refused(client: MPClient, tmp_path: Path) -> None:
    """/dev/shm is world-writable: a symlink, a hard link, a FIFO, a directory or a sparse file
    named like an engine segment must never be mapped (or written) by the server."""
    kv = make_kv("LBHNC", "float16")
    from lmcache.transfer.layouts import describe

    layout, _ = describe(kv)
    size = layout.storage_bytes[0]
    victim = tmp_path / "victim"
    victim.write_bytes(b"\x5a" * size)
    plain = f"/dev/shm/lmcache_kv_{os.getpid()}_plain"
    with open(plain, "wb") as f:
        f.write(b"\0" * size)
    cases = {
        "symlink": lambda path: os.symlink(victim, path),
        "hardlink": lambda path: os.link(plain, path),
        "fifo": lambda path: os.mkfifo(path),
        "directory": lambda path: os.mkdir(path),
        # Sparse: mapping it with MAP_POPULATE would allocate its whole size in the server.
        "sparse": lambda path: _sparse_file(path, size),
    }
    made = [plain]
    try:
        for kind, make in cases.items():
            name = f"/lmcache_kv_{os.getpid()}_{kind}"
            make("/dev/shm" + name)
            made.append("/dev/shm" + name)
            with pytest.raises(ServerError) as info:
                client.call(p.RegisterKVCache(f"evil-{kind}", "m", 1, 0, layout, [name], "engine_driven"), p.Registered)
            assert info.value.code == p.ErrorCode.BAD_REQUEST, kind
            assert name in info.value.message, info.value.message
        assert victim.read_bytes() == b"\x5a" * size
        assert not [e for e in client.status()["engines"] if e["instance_id"].startswith("evil-")]
    finally:
        for path in made:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
    assert client.ping() == p.Pong()


def test_slots_granted_after_the_client_gave_up_are_handed_back(server: ServerProcess, client: MPClient) -> None:
    """A server slower than the client's timeout: the Slots of a PrepareStore (or the locks of a
    PrepareRetrieve) arrive after the caller gave up. The client hands them back at once, so
    nothing stays reserved for a live engine that will never use it."""
    truth = Truth(client)
    cached = chunk_hashes(2, seed=7)
    truth.store(cached)
    with MPClient("127.0.0.1", server.port, timeout_s=0.5) as impatient:
        kv = make_kv("LBHNC", "float16")
        reg = register_kv_caches(impatient, kv, model="m", instance_id="impatient", mode="lmcache_driven")
        for call in (
            lambda: reg.store(chunk_hashes(4, seed=8), list(range(16))),
            lambda: reg.retrieve(cached, list(range(8))).retrieved,
        ):
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                # The stop is asynchronous: a thread still running could answer in time.
                wait_until(lambda: _all_threads_stopped(server.proc.pid), "every server thread is stopped")
                with pytest.raises(ServerUnavailableError):
                    call()
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            # The late reply is read (and undone) by the client's next call.
            wait_until(lambda: impatient.ping() is not None and _nothing_held(client), "the late grant was handed back")
        assert impatient.lookup(reg.scope(), cached) == 2


def _all_threads_stopped(pid: int) -> bool:
    return all(process_state(pid, int(task)) in ("T", "gone") for task in os.listdir(f"/proc/{pid}/task"))


def _nothing_held(client: MPClient) -> bool:
    status = client.status()
    l1 = status["l1"]
    return (l1["writing"], l1["read_locked"], l1["orphans"], status["tickets"]["open"]) == (0, 0, 0, 0)
