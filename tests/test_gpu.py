"""The GPU path on a real GPU: an engine process registers CUDA KV tensors with a real server
process over CUDA IPC; chunks go to pinned L1 and back byte for byte, for every layout and both
copy strategies, ordered by interprocess events with no synchronize() on the engine's side.
Skipped where there is no GPU; scripts/gpu_check.sh runs it on one."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import pytest

from lmcache import protocol as p
from lmcache.client import MPClient, ServerError
from lmcache.kv_transfer import KVTransfer, register_kv_caches
from lmcache.keys import prompt_hashes
from lmcache.server.process import ServerProcess
from lmcache.protocol import CudaIpcStorage
from lmcache.transfer.cuda_ipc import export_storages
from lmcache.transfer.layouts import describe
from lmcache.testing.vllm_like import LAYOUTS, KVShape, block_dim, fill, make_kv


def _have_gpu() -> bool:
    try:
        import cupy  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _have_gpu(), reason="needs a CUDA GPU, torch and CuPy")]
CHUNK = 32
SHAPE = KVShape(layers=4, blocks=64, block_size=16, heads=4, head_size=64)


@pytest.fixture(scope="module", params=["staging", "mapped"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with ServerProcess(l1_size_gb=1, extra_args=["--chunk-size", str(CHUNK), "--gpu-copy", request.param]) as proc:
        yield proc


def _until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


def _block(t, layout: str, block: int):
    import torch

    page = t.select(block_dim(layout), block)
    return page.contiguous().view(torch.uint8)


def _wait_copies(reg: KVTransfer, event: int) -> None:
    _until(lambda: reg.copied(event), "the server's GPU copy")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_between_processes_is_byte_exact(server: ServerProcess, layout: str) -> None:
    import torch

    kv = make_kv(layout, "bfloat16", SHAPE, device="cuda")
    fill(kv, layout, seed=3)
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, kv, f"m-{layout}", instance_id=f"gpu-{layout}-{uuid.uuid4().hex[:6]}")
        assert reg.mode == "cuda_ipc"
        n = 6
        hashes = prompt_hashes(random.Random(layout).choices(range(50_000), k=n * CHUNK), CHUNK)
        src, dst = list(range(1, 2 * n + 1)), list(range(40, 40 + 2 * n))
        want = [[_block(t, layout, b).clone() for b in src] for t in kv]
        reply = reg.store(hashes, src)
        assert reply.stored == n
        _wait_copies(reg, reply.event)
        _until(lambda: client.lookup(reg.scope(), hashes) == n, "the chunks to be published")
        written, event = reg.retrieve(hashes, dst, skip_blocks=1)  # dst holds other values until then
        assert written == n
        _wait_copies(reg, event)
        for layer, t in enumerate(kv):
            assert not torch.equal(_block(t, layout, dst[0]), want[layer][0]), "a skipped block was written"
            for i in range(1, 2 * n):
                assert torch.equal(_block(t, layout, dst[i]), want[layer][i]), f"layer {layer} block {dst[i]}"
        reg.unregister()


def test_the_server_waits_for_the_engines_stream_not_the_host(server: ServerProcess) -> None:
    """The engine writes its blocks after a long kernel on its stream and stores at once: the
    server's copy must see the new values, though nothing on the engine's side synchronized."""
    import torch

    layout = "LBHNC"
    kv = make_kv(layout, "float16", SHAPE, device="cuda")
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, kv, "m-order", instance_id=f"gpu-order-{uuid.uuid4().hex[:6]}")
        hashes = prompt_hashes(list(range(CHUNK)), CHUNK)
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time before the blocks get their values
        for t in kv:
            t[1:3].fill_(7.0)
        reply = reg.store(hashes, [1, 2])
        assert reply.stored == 1
        _wait_copies(reg, reply.event)
        _until(lambda: client.lookup(reg.scope(), hashes) == 1, "the chunk to be published")
        written, event = reg.retrieve(hashes, [10, 11])
        assert written == 1
        _wait_copies(reg, event)
        for t in kv:
            assert bool((t[10:12] == 7.0).all()), "the server copied the blocks before the engine wrote them"


def test_bad_handles_and_foreign_devices_get_errors_and_the_server_serves_on(server: ServerProcess) -> None:
    kv = make_kv("LBHNC", "float16", SHAPE, device="cuda")
    layout, storages = describe(kv)
    good = export_storages(storages)
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        forged = [CudaIpcStorage(s.device_uuid, bytes(reversed(s.handle)), s.offset, s.nbytes) for s in good]
        with pytest.raises(ServerError, match="cannot open|IPC"):
            client.call(p.RegisterKVCache("forged", "m", 1, 0, layout, [], "cuda_ipc", forged), p.Registered)
        foreign = [CudaIpcStorage(uuid.uuid4().hex, s.handle, s.offset, s.nbytes) for s in good]
        with pytest.raises(ServerError, match="cannot see the engine's GPU"):
            client.call(p.RegisterKVCache("foreign", "m", 1, 0, layout, [], "cuda_ipc", foreign), p.Registered)
        assert client.ping() == p.Pong()
        reg = register_kv_caches(client, kv, "m-after", instance_id=f"gpu-after-{uuid.uuid4().hex[:6]}")
        assert reg.store(prompt_hashes(list(range(CHUNK)), CHUNK), [1, 2]).stored == 1
