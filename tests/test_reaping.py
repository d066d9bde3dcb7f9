"""Registrations of engines that went quiet are dropped after --engine-ttl (a dead engine's SHM
or GPU mappings are closed), and a live engine that was only idle registers again by itself."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from lmcache._fast.pool import MemoryPool
from lmcache.client import MPClient
from lmcache.config import ConfigError, ConnectorConfig, ServerConfig
from lmcache.integration.vllm.adapter import StepMetadata, StoreOp, WorkerAdapter
from lmcache.keys import prompt_hashes
from lmcache.server.engine import CacheEngine
from lmcache.server.process import ServerProcess
from lmcache import protocol as p
from lmcache.protocol import CudaIpcStorage
from lmcache.testing.simulated_gpu import SimulatedRuntime
from lmcache.transfer.layouts import describe
from lmcache.transfer.registered import storage_array
from lmcache.testing.vllm_like import KVShape, make_kv

SHAPE = KVShape(layers=2, blocks=16, block_size=16, heads=2, head_size=8)


def _until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_quiet_engine_is_dropped_and_registers_again_on_its_next_store() -> None:
    kv = make_kv("LBHNC", "float16", SHAPE)
    with ServerProcess(extra_args=["--engine-ttl", "0.5", "--chunk-size", "32"]) as server, \
            MPClient("127.0.0.1", server.port, timeout_s=10) as client:
        config = ConnectorConfig(host="tcp://127.0.0.1", port=server.port, retry_interval_s=0.05)
        worker = WorkerAdapter(config, "m", 1, 0, instance_id="quiet")
        worker.register(kv)
        assert [e["instance_id"] for e in client.status()["engines"]] == ["quiet"]
        _until(lambda: client.status()["engines"] == [], "the quiet registration to be dropped")
        assert server.wait_for_line("Dropped the KV cache registration of GPU ID quiet", 5)

        hashes = prompt_hashes(list(range(64)), 32)
        step = StepMetadata(stores=[StoreOp("r1", hashes, [1, 2, 3, 4], "")])
        worker.save(step)  # fails once ("unknown instance"): a miss, nothing worse
        worker.flush(10)

        def stored_after_registering_again() -> bool:
            worker.save(step)
            worker.flush(10)
            return client.lookup(worker._kv.scope(), hashes) == 2 if worker._kv else False

        _until(stored_after_registering_again, "the worker to register again and store")
        worker.close()


def test_a_dead_gpu_engines_mappings_are_closed() -> None:
    kv = make_kv("LBHNC", "bfloat16", SHAPE)
    layout, storages = describe(kv)
    arrays = [storage_array(s) for s in storages]
    handles = [bytes([0x51 + i]) * 64 for i in range(len(arrays))]
    runtimes: list[SimulatedRuntime] = []

    def make(device: str, arena: np.ndarray, pin: bool) -> SimulatedRuntime:
        runtimes.append(SimulatedRuntime(arena, device, dict(zip(handles, arrays)), kernel="cpu"))
        return runtimes[-1]

    config = ServerConfig(l1_size_gb=4 / 1024, port=1, http_port=2, chunk_size=32, engine_ttl_s=0.2)
    engine = CacheEngine(config, MemoryPool(4 << 20, slab_bytes=1 << 20, prefault=False), gpu_runtime=make)
    engine.start()
    gpu = uuid.uuid4().hex
    engine.register_kv_cache(p.RegisterKVCache("dead", "m", 1, 0, layout, [], p.TransferMode.CUDA_IPC,
                                               [CudaIpcStorage(gpu, h, 0, a.nbytes) for h, a in zip(handles, arrays)]))
    _until(lambda: engine.status()["engines"] == [], "the dead engine's registration to be dropped")
    _until(lambda: runtimes[0].closed == handles, "its IPC mappings to be closed")
    engine.close()


def test_the_engine_ttl_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="greater than 0") as e:
        ServerConfig(l1_size_gb=1, engine_ttl_s=0)
    assert e.value.field == "engine_ttl_s"
