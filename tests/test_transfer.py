"""KV round trips through a real server (engine_driven SHM mode), byte for byte, for every
layout and dtype, and the errors of bad registrations and bad requests."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from lmcache import protocol as p
from lmcache.client import MPClient, ServerError
from lmcache.kv_transfer import register_kv_caches
from lmcache.keys import prompt_hashes
from lmcache.server.process import ServerProcess
from lmcache.page_layout import LayoutError
from lmcache.transfer.layouts import describe
from lmcache.testing.vllm_like import DTYPES, LAYOUTS, KVShape, block_bytes, fill, make_kv

CHUNK = 64  # 4 blocks of 16 tokens


@pytest.fixture(scope="module")
def kv_server() -> Iterator[ServerProcess]:
    with ServerProcess(extra_args=["--chunk-size", str(CHUNK), "--max-workers", "2"]) as server:
        yield server


@pytest.fixture
def kv_client(kv_server: ServerProcess) -> Iterator[MPClient]:
    with MPClient("127.0.0.1", kv_server.port, timeout_s=30) as c:
        yield c


def is_zero(data: bytes) -> bool:
    return not any(data)


def hashes_for(n_chunks: int, seed: int) -> bytes:
    return prompt_hashes(random.Random(seed).choices(range(30_000), k=CHUNK * n_chunks), CHUNK)


CASES = [(layout, "bfloat16", "engine_driven") for layout in LAYOUTS] + [
    ("LBNHC", "float16", "engine_driven"), ("LBHNC", "float32", "engine_driven"),
    ("LBNHC", "float8_e4m3fn", "engine_driven"), ("flash_attn", "float8_e5m2", "engine_driven"),
    ("BLHNC", "float16", "engine_driven"),
    ("LBHNC", "bfloat16", "lmcache_driven"), ("LBNHC", "float8_e4m3fn", "lmcache_driven"),
    ("BLNHC", "float32", "lmcache_driven"), ("flash_attn", "float16", "lmcache_driven"),
    ("flashinfer", "bfloat16", "lmcache_driven"), ("MLA", "bfloat16", "lmcache_driven"),
    ("MLA3", "float16", "lmcache_driven"), ("BLHNC", "float8_e5m2", "lmcache_driven"),
]


@pytest.mark.parametrize(("layout", "dtype", "mode"), CASES)
def test_round_trip_is_byte_exact(kv_client: MPClient, layout: str, dtype: str, mode: str) -> None:
    kv = make_kv(layout, dtype)
    fill(kv, layout, seed=hash((layout, dtype)) % 100)
    reg = register_kv_caches(kv_client, 
        kv, model=f"model-{layout}-{dtype}-{mode}", instance_id=f"{os.getpid()}-{layout}-{dtype}-{mode}", mode=mode
    )
    assert reg.mode == mode
    assert not any(name.startswith(f"lmcache_kv_{os.getpid()}_") for name in os.listdir("/dev/shm"))
    expected = [[block_bytes(t, layout, b) for b in range(32)] for t in kv]
    rng = random.Random(1)
    hashes = hashes_for(3, seed=2)
    src_blocks = rng.sample(range(32), 12)  # scattered over the cache
    reply = reg.store(hashes, src_blocks)
    assert (reply.stored, reply.present, reply.skipped) == (3, 0, 0)
    assert kv_client.lookup(reg.scope(), hashes) == 3

    for t in kv:
        t.zero_()  # the tensors are SHM-backed now; the server's copy lives in L1
    dst_blocks = rng.sample(range(32), 12)
    assert reg.retrieve(hashes, dst_blocks).retrieved == 3
    for layer, t in enumerate(kv):
        for src, dst in zip(src_blocks, dst_blocks):
            assert block_bytes(t, layout, dst) == expected[layer][src], (layer, src, dst)
        for b in set(range(32)) - set(dst_blocks):
            assert is_zero(block_bytes(t, layout, b)), f"block {b} was written"

    # Skipping leading blocks the engine already holds leaves them untouched.
    for t in kv:
        t.zero_()
    assert reg.retrieve(hashes[:16], dst_blocks[:4], skip_blocks=3).retrieved == 1
    for layer, t in enumerate(kv):
        assert is_zero(block_bytes(t, layout, dst_blocks[0]))
        assert is_zero(block_bytes(t, layout, dst_blocks[2]))
        assert block_bytes(t, layout, dst_blocks[3]) == expected[layer][src_blocks[3]]
    reg.unregister()


@pytest.mark.parametrize("mode", ["engine_driven", "lmcache_driven"])
def test_a_second_store_of_the_same_chunks_writes_nothing(kv_client: MPClient, mode: str) -> None:
    kv = make_kv("LBHNC", "bfloat16")
    fill(kv, "LBHNC")
    reg = register_kv_caches(kv_client, kv, model=f"dedupe-{mode}", instance_id=f"dedupe-{mode}", mode=mode)
    hashes = hashes_for(2, seed=5)
    assert reg.store(hashes, range(8)).stored == 2
    again = reg.store(hashes, range(8, 16))
    assert (again.stored, again.present) == (0, 2)


def test_chunks_never_cross_page_formats_or_salts(kv_client: MPClient) -> None:
    a = make_kv("LBNHC", "bfloat16")
    b = make_kv("LBHNC", "bfloat16")  # same sizes, other order inside a page
    fill(a, "LBNHC")
    reg_a = register_kv_caches(kv_client, a, model="shared", instance_id="fmt-a")
    reg_b = register_kv_caches(kv_client, b, model="shared", instance_id="fmt-b")
    assert reg_a.page_format != reg_b.page_format
    hashes = hashes_for(2, seed=9)
    assert reg_a.store(hashes, range(8), salt="tenant-1").stored == 2
    assert kv_client.lookup(reg_b.scope("tenant-1"), hashes) == 0
    assert reg_b.retrieve(hashes, range(8), salt="tenant-1").retrieved == 0
    assert all(is_zero(block_bytes(t, "LBHNC", blk)) for t in b for blk in range(8))
    assert kv_client.lookup(reg_a.scope("tenant-2"), hashes) == 0
    assert reg_a.retrieve(hashes, range(8, 16), salt="tenant-2").retrieved == 0


@pytest.mark.parametrize("mode", ["engine_driven", "lmcache_driven"])
def test_retrieve_stops_at_the_first_missing_chunk(kv_client: MPClient, mode: str) -> None:
    kv = make_kv("LBNHC", "float16")
    fill(kv, "LBNHC")
    reg = register_kv_caches(kv_client, kv, model=f"gaps-{mode}", instance_id=f"gaps-{mode}", mode=mode)
    hashes = hashes_for(3, seed=11)
    reg.store(hashes[:16], range(4))  # only chunk 0
    for t in kv:
        t.zero_()
    assert reg.retrieve(hashes, range(12)).retrieved == 1
    assert all(is_zero(block_bytes(t, "LBNHC", blk)) for t in kv for blk in range(4, 12))


@pytest.mark.parametrize(
    ("make_request", "text"),
    [
        (lambda reg, h: p.Store("nobody", h, list(range(4))), "unknown instance"),
        (lambda reg, h: p.Store(reg.instance_id, h, list(range(3))), "need 4 block ids"),
        (lambda reg, h: p.Store(reg.instance_id, h, [0, 1, 2, 32]), "block ids must lie in [0, 32)"),
        (lambda reg, h: p.Retrieve(reg.instance_id, h, [-1, 0, 1, 2]), "block_ids[0]: Expected `int` >= 0"),
        (lambda reg, h: p.Store(reg.instance_id, h, [0, 1, 2, 2**63]), "block_ids[3]: Expected `int` <= "),
        (lambda reg, h: p.Retrieve(reg.instance_id, h[:15], [0, 1, 2, 3]), "16-byte"),
        (lambda reg, h: p.UnregisterKVCache("nobody"), "unknown instance"),
    ],
)
def test_bad_requests_get_errors_and_change_nothing(kv_client: MPClient, make_request, text: str) -> None:
    kv = make_kv("LBNHC", "bfloat16")
    reg = register_kv_caches(kv_client, kv, model="bad", instance_id="bad", mode="engine_driven")
    hashes = hashes_for(1, seed=13)
    with pytest.raises(ServerError) as info:
        kv_client.submit(make_request(reg, hashes)).result()
    unknown = text == "unknown instance"  # its own code: the connector registers again on it
    assert info.value.code == (p.ErrorCode.UNKNOWN_INSTANCE if unknown else p.ErrorCode.BAD_REQUEST)
    assert text in info.value.message
    assert kv_client.lookup(reg.scope(), hashes) == 0
    assert kv_client.ping() == p.Pong()


def _register_raw(client: MPClient, layout, segments: list[str]) -> ServerError:
    with pytest.raises(ServerError) as info:
        client.call(p.RegisterKVCache("raw", "m", 1, 0, layout, segments, "engine_driven"), p.Registered)
    return info.value


def test_bad_registrations_are_refused_clearly(kv_client: MPClient) -> None:
    kv = make_kv("LBNHC", "bfloat16")
    layout, _ = describe(kv)
    assert "does not exist" in _register_raw(kv_client, layout, ["/lmcache_kv_0_999999"]).message
    assert "not an LMCache segment name" in _register_raw(kv_client, layout, ["/etc/passwd"]).message
    assert "segments were named" in _register_raw(kv_client, layout, []).message
    # a segment of the wrong size
    name = f"/lmcache_kv_{os.getpid()}_wrongsize"
    with open(f"/dev/shm{name}", "wb") as f:
        f.write(b"\0" * 100)
    try:
        assert "has 100 bytes" in _register_raw(kv_client, layout, [name]).message
    finally:
        os.unlink(f"/dev/shm{name}")
    # a block size the chunk size is not a multiple of
    odd = make_kv("LBNHC", "bfloat16", KVShape(block_size=48))
    reg_error = pytest.raises(ServerError)
    with reg_error as info:
        register_kv_caches(kv_client, odd, model="m", instance_id="odd", mode="engine_driven")
    assert "not a multiple of the engine's block size 48" in info.value.message
    assert kv_client.ping() == p.Pong()


def test_layout_descriptor_refuses_what_it_cannot_describe() -> None:
    with pytest.raises(LayoutError, match="not one contiguous page"):
        describe([torch.zeros(8, 16, 2, 4)[:, ::2]])  # a strided view: pages are not contiguous
    with pytest.raises(LayoutError, match="unsupported dtype"):
        describe([torch.zeros(4, 2, 16, 8, dtype=torch.int64)])
    with pytest.raises(LayoutError, match="differ"):
        describe([torch.zeros(4, 2, 16, 8), torch.zeros(5, 2, 16, 8)])
    with pytest.raises(LayoutError, match="no dim of size 2"):
        describe([torch.zeros(4, 3, 16, 2, 8)])


def test_layout_facts() -> None:
    layout, storages = describe(make_kv("LBHNC", "bfloat16"))
    assert len(storages) == 1 and layout.num_layers == 2 and layout.parts == 1
    assert layout.page_bytes == 2 * 16 * 8 * 2 and layout.inner == "HNC"
    assert describe(make_kv("LBNHC", "bfloat16"))[0].inner == "NHC"
    fa, fa_storages = describe(make_kv("flash_attn", "float16"))
    assert len(fa_storages) == 2 and fa.parts == 2 and fa.page_bytes == 16 * 2 * 8 * 2
    fi = describe(make_kv("flashinfer", "float16"))[0]
    assert fi.parts == 1 and fi.page_bytes == 2 * 16 * 2 * 8 * 2
    bl = describe(make_kv("BLNHC", "bfloat16"))[0]
    assert bl.layers[0].block_stride == 2 * layout.page_bytes  # block-outermost: layers interleave
    assert bl.page_format == describe(make_kv("LBNHC", "bfloat16"))[0].page_format
    offsets = layout.page_offsets(np.array([3, 1]))
    assert offsets.shape == (2, 2) and offsets[0, 0] == 3 * layout.page_bytes


def test_auto_mode_picks_lmcache_driven_when_the_server_offers_it(kv_client: MPClient) -> None:
    assert "lmcache_driven" in kv_client.hello().transfer_modes
    reg = register_kv_caches(kv_client, make_kv("LBHNC", "bfloat16"), model="auto", instance_id="auto")
    assert reg.mode == "lmcache_driven"


def test_without_an_shm_arena_only_engine_driven_is_served() -> None:
    with ServerProcess(extra_args=["--chunk-size", str(CHUNK), "--no-l1-shm"]) as server, \
            MPClient("127.0.0.1", server.port) as client:
        assert client.hello().transfer_modes == ["engine_driven"]
        kv = make_kv("LBHNC", "bfloat16")
        with pytest.raises(ServerError, match="not served here"):
            register_kv_caches(client, kv, model="m", instance_id="x", mode="lmcache_driven")
        assert register_kv_caches(client, kv, model="m", instance_id="y").mode == "engine_driven"
        assert not any(n.startswith("lmcache_l1_") for n in os.listdir("/dev/shm") if n.endswith(str(server.proc.pid)))


def test_a_paused_writer_keeps_its_slots_until_it_commits() -> None:
    """A store prepared by a live engine that overstays the lock TTL (paused): the chunks leave
    the index, but their slots are never handed to anyone else while the engine may still write
    them; its late commit publishes nothing and frees them."""
    with ServerProcess(extra_args=["--chunk-size", str(CHUNK), "--lock-ttl", "0.5"]) as server, \
            MPClient("127.0.0.1", server.port) as client:
        kv = make_kv("LBHNC", "bfloat16")
        reg = register_kv_caches(client, kv, model="m", instance_id="paused", mode="lmcache_driven")
        hashes = hashes_for(2, seed=21)
        slots = client.call(p.PrepareStore(reg.instance_id, hashes), p.Slots)
        assert all(offset >= 0 for offset in slots.offsets)
        assert client.status()["l1"]["writing"] == 2
        held_bytes = client.status()["l1"]["used_bytes"]
        assert client.lookup(reg.scope(), hashes) == 0  # being written: invisible
        deadline = time.monotonic() + 30
        while client.status()["l1"]["writing"]:
            assert time.monotonic() < deadline, "the write locks never expired"
        l1 = client.status()["l1"]
        assert (l1["objects"], l1["orphans"], l1["used_bytes"]) == (0, 2, held_bytes)
        # Another engine storing the same chunks now gets other slots.
        other = register_kv_caches(client, make_kv("LBHNC", "bfloat16"), model="m", instance_id="other", mode="lmcache_driven")
        again = client.call(p.PrepareStore(other.instance_id, hashes), p.Slots)
        assert not set(again.offsets) & set(slots.offsets)
        client.call(p.CommitStore(again.ticket, [True, True]), p.StoreReply)
        late = client.call(p.CommitStore(slots.ticket, [True, True]), p.StoreReply)
        assert late.stored == 0  # its locks expired: nothing of it is published
        l1 = client.status()["l1"]
        assert (l1["objects"], l1["orphans"], l1["used_bytes"]) == (2, 0, held_bytes)
        assert client.lookup(reg.scope(), hashes) == 2
