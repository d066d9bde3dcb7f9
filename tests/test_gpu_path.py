"""The GPU path without a GPU: CUDA IPC descriptions and their validation, the wire messages,
the engine's asynchronous store and retrieve over a simulated device (chunks published, read
locks released, only once the queued copies have run), and a real server refusing GPU
registrations it cannot serve while it goes on serving everyone else."""

from __future__ import annotations

import random
import time
import uuid

import numpy as np
import pytest

from lmcache import protocol as p
from lmcache._fast.pool import MemoryPool
from lmcache.client import MPClient, ServerError
from lmcache.kv_transfer import register_kv_caches
from lmcache.config import ServerConfig
from lmcache.keys import prompt_hashes
from lmcache.server.engine import CacheEngine
from lmcache.server.errors import RequestError
from lmcache.server.process import ServerProcess
from lmcache.protocol import CudaIpcStorage
from lmcache.transfer.cuda_ipc import IpcError, normalize_uuid, validate
from lmcache.testing.simulated_gpu import SimulatedRuntime
from lmcache.transfer.layouts import describe
from lmcache.transfer.registered import storage_array
from lmcache.testing.vllm_like import KVShape, fill, make_kv

GPU = "6f1c2d3e4a5b60718293a4b5c6d7e8f9"
CHUNK = 32  # two blocks of 16


def test_device_uuids_in_every_spelling_are_one() -> None:
    spellings = [f"GPU-{uuid.UUID(GPU)}", str(uuid.UUID(GPU)).upper(), uuid.UUID(GPU), bytes.fromhex(GPU), GPU]
    assert {normalize_uuid(s) for s in spellings} == {GPU}
    for bad in ("GPU-1234", "", b"short", "zz" * 16):
        with pytest.raises(IpcError):
            normalize_uuid(bad)


def test_ipc_descriptions_are_checked_against_the_layout() -> None:
    good = CudaIpcStorage(GPU, b"\x01" * 64, 0, 4096)
    assert validate([good], [4096]) == GPU
    cases = {
        "2 storages but 1 IPC handles": ([good], [4096, 4096]),
        "an IPC handle is 64 bytes, got 3": ([CudaIpcStorage(GPU, b"abc", 0, 4096)], [4096]),
        "all zeros": ([CudaIpcStorage(GPU, bytes(64), 0, 4096)], [4096]),
        "offset must be >= 0": ([CudaIpcStorage(GPU, b"\x01" * 64, -8, 4096)], [4096]),
        "the layout needs 8192": ([good], [8192]),
        "on one device": ([good, CudaIpcStorage("a" * 32, b"\x02" * 64, 0, 4096)], [4096, 4096]),
        "not a device UUID": ([CudaIpcStorage("GPU-0", b"\x01" * 64, 0, 4096)], [4096]),
    }
    for message, (storages, sizes) in cases.items():
        with pytest.raises(IpcError, match=message):
            validate(storages, sizes)


def test_gpu_fields_cross_the_wire() -> None:
    kv = make_kv("LBHNC", "bfloat16", KVShape(layers=2, blocks=4, block_size=16, heads=2, head_size=8))
    layout, _ = describe(kv)
    storage = CudaIpcStorage(GPU, bytes(range(64)), 128, layout.storage_bytes[0])
    register = p.RegisterKVCache("w0", "m", 1, 0, layout, [], "cuda_ipc", [storage])
    assert p.decode_request(p.encode(register)) == register
    store = p.Store("w0", b"\x01" * 16, [1, 2], "", b"\x07" * 64)
    assert p.decode_request(p.encode(store)).event == b"\x07" * 64
    assert p.decode_reply(p.encode(p.StoreReply(2, 0, 0, 5))).event == 5
    assert p.decode_reply(p.encode(p.RetrieveReply(2, 9))).event == 9
    assert p.decode_reply(p.encode(p.Registered("f", 2, 64, events=[b"\x01" * 64]))).events == [b"\x01" * 64]
    assert p.decode_reply(p.encode(p.StoreReply(1, 0, 0))).event == -1  # CPU replies need no event


class _Engine:
    """A CacheEngine whose one "GPU" is host memory: exported storages are looked up by handle."""

    def __init__(self, layout_name: str = "LBHNC") -> None:
        self.kv = make_kv(layout_name, "bfloat16", KVShape(layers=2, blocks=16, block_size=16, heads=2, head_size=8))
        fill(self.kv, layout_name)
        self.layout, storages = describe(self.kv)
        self.arrays = [storage_array(s) for s in storages]
        self.handles = [bytes([0x40 + i]) * 64 for i in range(len(self.arrays))]
        self.runtimes: list[SimulatedRuntime] = []

        def make(device: str, arena: np.ndarray, pin: bool) -> SimulatedRuntime:
            rt = SimulatedRuntime(arena, device, dict(zip(self.handles, self.arrays)), kernel="cpu", hold=True)
            self.runtimes.append(rt)
            return rt

        config = ServerConfig(l1_size_gb=4 / 1024, port=1, http_port=2, chunk_size=CHUNK)
        self.engine = CacheEngine(config, MemoryPool(4 << 20, slab_bytes=1 << 20, prefault=False), gpu_runtime=make)
        self.engine.start()

    def register(self, instance: str = "gpu0", handles: list[bytes] | None = None) -> object:
        ipc = [CudaIpcStorage(f"GPU-{uuid.UUID(GPU)}", h, 0, a.nbytes)
               for h, a in zip(handles or self.handles, self.arrays)]
        self.registered = self.engine.register_kv_cache(
            p.RegisterKVCache(instance, "m", 1, 0, self.layout, [], p.TransferMode.CUDA_IPC, ipc)
        )
        return self.engine.registry.get(instance)


def _until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _block(arrays: list[np.ndarray], layout, block: int) -> bytes:
    pages = layout.page_offsets(np.array([block]))
    return b"".join(
        bytes(arrays[layer.storage][off : off + layout.page_bytes])
        for layer, row in zip(layout.layers, pages) for off in row
    )


def test_gpu_store_publishes_only_after_the_copy_and_retrieve_holds_its_locks_until_then() -> None:
    h = _Engine()
    eng = h.engine
    reg = h.register()
    assert h.registered.events == h.runtimes[0].event_handles
    hashes = prompt_hashes(random.Random(1).choices(range(50_000), k=2 * CHUNK), CHUNK)
    scope = reg.scope("")

    stored, present, skipped, event = eng.store("gpu0", hashes, [3, 4, 5, 6], event=b"\x05" * 64)
    assert (stored, present, skipped, event) == (2, 0, 0, 0)
    assert h.runtimes[0].waited == [b"\x05" * 64]  # the server's stream waits for the engine
    assert eng.lookup(scope, hashes) == 0  # the copy has not run: nothing is visible yet
    h.runtimes[0].release()
    _until(lambda: eng.lookup(scope, hashes) == 2, "the stored chunks to be published")

    written, event = eng.retrieve("gpu0", hashes, [8, 9, 10, 11], skip_blocks=1, event=b"\x06" * 64)
    assert (written, event) == (2, 1)
    assert eng.l1.stats()["read_locked"] == 2  # held while the copy is in flight
    h.runtimes[0].release()
    _until(lambda: eng.l1.stats()["read_locked"] == 0, "the read locks to be released")
    assert _block(h.arrays, h.layout, 8) != _block(h.arrays, h.layout, 3)  # skipped: left as it was
    for src, dst in zip([4, 5, 6], [9, 10, 11]):
        assert _block(h.arrays, h.layout, dst) == _block(h.arrays, h.layout, src)

    eng.unregister_kv_cache("gpu0")
    with pytest.raises(RequestError, match="unknown instance"):
        eng.store("gpu0", hashes, [3, 4, 5, 6])
    assert h.runtimes[0].closed == []  # not before the copies queued ahead of the close have run
    h.runtimes[0].release()
    _until(lambda: h.runtimes[0].closed == h.handles, "the IPC handles to be closed")
    _until(lambda: sorted(h.runtimes[0].forgotten) == [b"\x05" * 64, b"\x06" * 64], "the engine's events to be closed")
    eng.close()


def test_bad_gpu_input_gets_a_clear_error_and_changes_nothing() -> None:
    h = _Engine()
    eng = h.engine
    with pytest.raises(RequestError, match="cannot open the engine's CUDA IPC handle"):
        h.register(handles=[b"\x99" * 64 for _ in h.handles])
    reg = h.register()
    hashes = prompt_hashes(list(range(CHUNK)), CHUNK)
    with pytest.raises(RequestError, match="64 bytes"):
        eng.store("gpu0", hashes, [1, 2], event=b"short")
    assert eng.l1.stats()["writing"] == 0 and eng.lookup(reg.scope(""), hashes) == 0
    h.runtimes[0].release()
    assert eng.store("gpu0", hashes, [1, 2])[0] == 1  # the same chunk stores fine afterwards
    h.runtimes[0].release()
    _until(lambda: eng.lookup(reg.scope(""), hashes) == 1, "the chunk to be published")
    with pytest.raises(RequestError, match="64 bytes"):
        eng.retrieve("gpu0", hashes, [5, 6], event=b"x" * 65)
    assert eng.l1.stats()["read_locked"] == 0
    eng.close()


def test_torch_shareable_handles_are_unwrapped() -> None:
    from lmcache.transfer.cuda_ipc import _raw_handle

    raw = bytes(range(64))
    assert _raw_handle(raw) == raw  # older torch: the bare cudaIpcMemHandle_t
    assert _raw_handle(b"\x01c" + raw) == raw  # version byte, cudaMalloc kind, handle
    with pytest.raises(IpcError, match="expandable_segments:False"):
        _raw_handle(b"\x01e" + b"\x00" * 80)
    with pytest.raises(IpcError, match="unrecognised"):
        _raw_handle(b"\x01x" + raw)


def test_a_fence_names_an_event_only_for_gpu_engines() -> None:
    h = _Engine()
    reg = h.register()
    assert h.engine.fence("gpu0") == 0 and h.engine.fence("gpu0") == 1  # the next event each time
    with pytest.raises(RequestError, match="unknown instance"):
        h.engine.fence("nobody")
    assert reg.mode == p.TransferMode.CUDA_IPC
    h.runtimes[0].release()
    h.engine.close()


def test_a_server_without_a_usable_gpu_refuses_gpu_registrations_and_keeps_serving() -> None:
    kv = make_kv("LBHNC", "float16", KVShape(layers=2, blocks=8, block_size=16, heads=2, head_size=8))
    layout, _ = describe(kv)
    size = layout.storage_bytes[0]
    with ServerProcess() as server, MPClient("127.0.0.1", server.port, timeout_s=10) as client:
        bad_handle = p.RegisterKVCache("g", "m", 1, 0, layout, [], "cuda_ipc", [CudaIpcStorage(GPU, b"x", 0, size)])
        with pytest.raises(ServerError, match="IPC handle is 64 bytes") as e:
            client.call(bad_handle, p.Registered)
        assert e.value.code == p.ErrorCode.BAD_REQUEST
        elsewhere = p.RegisterKVCache("g", "m", 1, 0, layout, [], "cuda_ipc", [CudaIpcStorage(GPU, b"\x01" * 64, 0, size)])
        with pytest.raises(ServerError, match="CUDA|GPU") as e:
            client.call(elsewhere, p.Registered)
        assert e.value.code == p.ErrorCode.BAD_REQUEST
        assert client.status()["engines"] == []
        assert client.ping() == p.Pong()
        reg = register_kv_caches(client, kv, "m", mode="lmcache_driven")
        assert reg.mode == "lmcache_driven"
        assert client.call(p.Fence(reg.instance_id), p.Fenced).event == -1  # a CPU engine: nothing to fence


def test_copies_held_up_by_a_slow_engine_keep_their_locks_renewed() -> None:
    from lmcache.server.devices import GpuCompletions

    runtime = SimulatedRuntime(np.zeros(64, dtype=np.uint8), hold=True)
    renewed: list[list] = []
    done = GpuCompletions("dev", renew=renewed.append, renew_every_s=0.01)
    finished: list[bool] = []
    _, marker = runtime.mark()
    done.when_done(runtime, marker, finished.append, ["lock-a", "lock-b"])
    _until(lambda: len(renewed) >= 3, "the locks to be renewed while the copy waits")
    assert renewed[-1] == ["lock-a", "lock-b"] and finished == []
    runtime.release()
    _until(lambda: finished == [True], "the copy's follow-up to run")
    done.close()


def test_a_fence_is_answered_after_the_engines_earlier_store() -> None:
    """The server runs a Fence after every earlier request of its engine, even with several
    copy threads, so the event it names is recorded behind their copies."""
    kv = make_kv("LBHNC", "bfloat16", KVShape(layers=8, blocks=130, block_size=16, heads=8, head_size=256))
    with ServerProcess(l1_size_gb=1, extra_args=["--max-workers", "2"]) as server, \
            MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, kv, "m", mode="engine_driven", instance_id="fenced")
        hashes = prompt_hashes(random.Random(5).choices(range(50_000), k=8 * 256), 256)
        store = client.submit(p.Store(reg.instance_id, hashes, list(range(1, 129))))
        fence = client.submit(p.Fence(reg.instance_id))
        assert fence.result(30) == p.Fenced(-1) and store.result(30).stored == 8
        assert store.done_at <= fence.done_at
