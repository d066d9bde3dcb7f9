"""Tenants (cache salts) sharing one L1: the tenant holding the most gives first, so a flood of
one tenant's random prompts cannot push another's system prompt out; per-salt quotas (hard
limits, PUT/GET/DELETE /quota/{salt}, a default for the rest) make a tenant evict its own chunks
first; /status and /metrics show usage per tenant, bounded, without ever printing a salt.
"""

from __future__ import annotations

import random

import httpx
import pytest

from lmcache.client import MPClient
from lmcache.config import ServerConfig
from lmcache.keys import MAX_NAME_CHARS, CacheScope, prompt_hashes
from lmcache.kv_transfer import register_kv_caches
from lmcache.server.engine import CacheEngine, tenant_id
from lmcache.server.errors import RequestError
from lmcache.server.process import ServerProcess
from lmcache.storage.eviction import LRUPolicy
from lmcache.storage.l1 import L1Cache
from lmcache.testing.vllm_like import make_kv
from test_l1 import OBJ, Clock, hashes, look, store

QUIET = CacheScope("model", 1, 0, "fmt", "quiet")
FLOOD = CacheScope("model", 1, 0, "fmt", "flood")


def make_l1(slots: int = 8) -> L1Cache:
    from lmcache._fast.pool import MemoryPool

    return L1Cache(MemoryPool(slots * OBJ, slab_bytes=slots * OBJ, prefault=False), LRUPolicy, 30.0, Clock())


def test_the_tenant_holding_the_most_gives_first() -> None:
    l1 = make_l1()
    system = hashes(2)
    store(l1, system, QUIET)  # stored first: the oldest chunks in L1
    for i in range(50):
        store(l1, hashes(1, 1000 + 16 * i), FLOOD)
    assert look(l1, QUIET, system)[0] == 2  # global LRU would have taken these first
    tenants = {t["salt"]: t for t in l1.tenants(10)["top"]}
    assert tenants["quiet"]["objects"] == 2 and tenants["flood"]["objects"] == 6


def test_a_tenant_over_its_quota_evicts_its_own_chunks_and_a_full_locked_quota_skips() -> None:
    l1 = make_l1()
    l1.set_quota("flood", 2 * OBJ)
    store(l1, hashes(3, 500), QUIET)
    for i in range(5):
        store(l1, hashes(1, 1000 + 16 * i), FLOOD)
    usage = {t["salt"]: t for t in l1.tenants(10)["top"]}
    assert usage["flood"]["used_bytes"] == 2 * OBJ and usage["quiet"]["objects"] == 3
    assert l1.stats()["evictions"] == 3  # all of them the flooder's own, with room to spare in L1
    last = hashes(1, 1000 + 16 * 4)
    held = look(l1, FLOOD, hashes(1, 1000 + 16 * 3), lock=True)[1] + look(l1, FLOOD, last, lock=True)[1]
    store(l1, hashes(1, 9000), FLOOD)  # both of its chunks are locked: nothing of its own to evict
    assert {t["salt"]: t for t in l1.tenants(10)["top"]}["flood"]["quota_skipped"] == 1
    l1.release(held)
    l1.set_quota("flood", None)  # back to no limit
    store(l1, hashes(1, 9000), FLOOD)
    assert look(l1, FLOOD, hashes(1, 9000))[0] == 1


def test_tenant_figures_stay_bounded_and_empty_tenants_are_forgotten() -> None:
    l1 = make_l1(slots=64)
    for i in range(40):
        store(l1, hashes(1, 16 * i), CacheScope("model", 1, 0, "fmt", f"t{i}"))
    view = l1.tenants(5)
    assert len(view["top"]) == 5 and view["others"]["tenants"] == 35 and view["others"]["objects"] == 35
    l1.clear()
    assert l1.tenants(5) == {"top": [], "others": {"tenants": 0, "used_bytes": 0, "objects": 0, "hits": 0, "stored": 0,
                                                   "quota_skipped": 0}}


def test_salts_never_appear_in_status_or_metrics_only_their_digests() -> None:
    assert tenant_id("") == "" and tenant_id("secret") != tenant_id("secret2") and "secret" not in tenant_id("secret")


# --- through a real server ------------------------------------------------------------------


@pytest.fixture
def server():
    with ServerProcess(l1_size_gb=0.002) as s:  # 2 MiB: about 100 chunks of 16 KiB
        yield s


def _prompt(rng: random.Random) -> bytes:
    return prompt_hashes(rng.choices(range(30_000), k=512), 256)


def test_a_flooding_tenant_does_not_push_out_another_tenants_system_prompt(server: ServerProcess) -> None:
    http = f"{server.http_url}"
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, make_kv("LBHNC", "bfloat16"), model="tenants", mode="engine_driven")
        system = _prompt(random.Random(1))
        assert reg.store(system, range(32), salt="quiet").stored == 2
        rng = random.Random(2)
        hits = 0
        for i in range(300):  # random prompts, 600 chunks: six times L1
            reg.store(_prompt(rng), range(32), salt="flood")
            if i % 30 == 29:  # the quiet tenant comes back now and then
                hits += client.lookup(reg.scope("quiet"), system)
        assert hits == 2 * 10
        status = httpx.get(f"{http}/status", timeout=10).json()
        assert status["l1"]["evictions"] > 0
        top = {t["tenant"]: t for t in status["tenants"]["top"]}
        assert top[tenant_id("quiet")]["objects"] == 2 and top[tenant_id("quiet")]["hits"] == 20
        assert "flood" not in str(status["tenants"]) and "quiet" not in str(status["tenants"])

        # A quota: the flooder keeps to it, evicting its own chunks.
        r = httpx.put(f"{http}/quota/flood", json={"limit_gb": 0.0005}, timeout=10)
        assert r.status_code == 200 and r.json() == {"tenant": tenant_id("flood"), "limit_gb": 0.0005, "own": True}
        for _ in range(20):
            reg.store(_prompt(rng), range(32), salt="flood")
        status = httpx.get(f"{http}/status", timeout=10).json()
        flood = {t["tenant"]: t for t in status["tenants"]["top"]}[tenant_id("flood")]
        assert flood["used_bytes"] <= 0.0005 * (1 << 30)
        assert httpx.get(f"{http}/quota", timeout=10).json() == {
            "default_limit_gb": None, "quotas": [{"tenant": tenant_id("flood"), "limit_gb": 0.0005}]}
        metrics = httpx.get(f"{http}/metrics", timeout=10).text
        assert f'lmcache_tenant_used_bytes{{tenant="{tenant_id("flood")}"}} {float(flood["used_bytes"])}' in metrics
        assert f'lmcache_tenant_hit_chunks_total{{tenant="{tenant_id("quiet")}"}} 20.0' in metrics

        assert httpx.delete(f"{http}/quota/flood", timeout=10).json()["own"] is False
        assert httpx.get(f"{http}/quota", timeout=10).json()["quotas"] == []


@pytest.mark.parametrize("body", [{"limit_gb": -1}, {"limit_gb": "1"}, {"limit_gb": True}, {"limit": 1}, [1], {"limit_gb": 1e9}])
def test_bad_quotas_are_refused_and_change_nothing(server: ServerProcess, body: object) -> None:
    r = httpx.put(f"{server.http_url}/quota/t", json=body, timeout=10)
    assert r.status_code == 400 and r.json()["status"] == "error"
    assert httpx.get(f"{server.http_url}/quota", timeout=10).json()["quotas"] == []
    r = httpx.put(f"{server.http_url}/quota/t", content=b"{not json", timeout=10)
    assert r.status_code == 400


def test_a_salt_no_request_could_carry_is_refused(server: ServerProcess) -> None:
    r = httpx.put(f"{server.http_url}/quota/{'s' * (MAX_NAME_CHARS + 1)}", json={"limit_gb": 0.001}, timeout=10)
    assert r.status_code == 400 and "at most" in r.json()["reason"]
    assert httpx.get(f"{server.http_url}/quota", timeout=10).json()["quotas"] == []


def test_the_quota_table_is_bounded_and_existing_quotas_still_change() -> None:
    from lmcache._fast.pool import MemoryPool

    engine = CacheEngine(ServerConfig(l1_size_gb=8 * OBJ / (1 << 30), port=1, http_port=2),
                         MemoryPool(8 * OBJ, slab_bytes=8 * OBJ, prefault=False))
    engine.MAX_QUOTAS = 3  # type: ignore[misc]
    try:
        for salt in ("a", "b", "c"):
            engine.set_quota(salt, 0)
        with pytest.raises(RequestError, match="at most 3"):
            engine.set_quota("d", 0)
        engine.set_quota("a", None)  # a DELETE, and a change of an existing quota, always go through
        engine.set_quota("b", 0)
        engine.set_quota("d", 0)
        assert sorted(engine.l1.quotas()) == ["b", "c", "d"]
    finally:
        engine.close()
