"""Tenants (cache salts) sharing one L1: the tenant holding the most gives first, so a flood of
one tenant's random prompts cannot push another's system prompt out; per-salt quotas (hard
limits, PUT/GET/DELETE /quota/{salt}, a default for the rest) make a tenant evict its own chunks
first; /status and /metrics show usage per tenant, bounded, without ever printing a salt.
"""

from __future__ import annotations

import random
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
        assert f'lmcache_tenant_hit_chunks{{tenant="{tenant_id("quiet")}"}} 20.0' in metrics

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


def _encode(salt: str) -> str:
    """A salt as one path segment: "." and ".." too (clients resolve those segments away)."""
    return quote(salt, safe="").replace(".", "%2E")


def test_a_quota_lands_on_the_salt_requests_carry_whatever_its_characters(server: ServerProcess) -> None:
    http = f"{server.http_url}/quota"
    salts = ["tenant ä/1", "a b", "a/b", "100%", "%41", "..", ".", "a?b", "a#b", "x\x00y", "tab\tx", "+plus",
             "semi;colon", "emoji\U0001F600", "back\\slash", " " * MAX_NAME_CHARS]
    for salt in salts:
        r = httpx.put(f"{http}/{_encode(salt)}", json={"limit_gb": 0}, timeout=10)
        assert r.status_code == 200 and r.json()["tenant"] == tenant_id(salt), (salt[:20], r.text[:200])
        assert httpx.get(f"{http}/{_encode(salt)}", timeout=10).json() == {"tenant": tenant_id(salt), "limit_gb": 0.0,
                                                                           "own": True}
    assert {q["tenant"] for q in httpx.get(http, timeout=10).json()["quotas"]} == {tenant_id(s) for s in salts}
    # The empty salt (requests without one) and salts too long for a request line: /quota/.
    assert httpx.put(f"{http}/?salt=", json={"limit_gb": 0}, timeout=10).json() == {"tenant": "", "limit_gb": 0.0,
                                                                                     "own": True}
    long = "\u00e4" * MAX_NAME_CHARS
    assert httpx.put(f"{http}/", json={"salt": long, "limit_gb": 0}, timeout=10).json()["tenant"] == tenant_id(long)
    assert httpx.get(f"{http}?salt=", timeout=10).json()["own"] is True
    for bad in ("%FF", "%C3", "%ED%A0%80"):  # not UTF-8: no request could carry it
        r = httpx.put(f"{http}/{bad}", json={"limit_gb": 0}, timeout=10)
        assert r.status_code == 400 and r.json()["status"] == "error"
    assert httpx.put(f"{http}/", json={"limit_gb": 0}, timeout=10).status_code == 400  # no salt named
    assert httpx.put(f"{http}/a?salt=b", json={"limit_gb": 0}, timeout=10).status_code == 400  # two

    # The quotas hold for the tenants' own stores.
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, make_kv("LBHNC", "bfloat16"), model="tenants", mode="engine_driven")
        rng = random.Random(3)
        for salt in ("tenant ä/1", "", "."):
            stored = reg.store(_prompt(rng), range(32), salt=salt)
            assert stored.stored == 0 and stored.skipped == 2, salt
        assert httpx.delete(f"{http}/{_encode('tenant ä/1')}", timeout=10).json()["own"] is False
        assert httpx.delete(f"{http}/?salt=", timeout=10).json()["own"] is False
        assert reg.store(_prompt(rng), range(32), salt="tenant ä/1").stored == 2
        assert reg.store(_prompt(rng), range(32)).stored == 2


def test_every_quota_method_answers_a_salt_too_long_with_400_json(server: ServerProcess) -> None:
    salt = "s" * (MAX_NAME_CHARS + 1)
    for url, body in ((f"{server.http_url}/quota/{salt}", {}), (f"{server.http_url}/quota/", {"salt": salt})):
        for method in ("PUT", "DELETE", "GET"):
            r = httpx.request(method, url, json=body | {"limit_gb": 0} if method == "PUT" else body or None, timeout=10)
            assert r.status_code == 400 and r.json()["status"] == "error" and "at most" in r.json()["reason"], method
    assert httpx.get(f"{server.http_url}/healthcheck", timeout=10).status_code == 200
    assert "Traceback" not in server.output()
    assert 'lmcache_http_requests_total{route="/quota",status="400"} 6.0' in httpx.get(
        f"{server.http_url}/metrics", timeout=10).text


def _counters(server: ServerProcess) -> tuple[dict[tuple[str, tuple], float], dict[str, str]]:
    """Every sample of a counter on /metrics, and the type of every lmcache_tenant_* family."""
    families = list(text_string_to_metric_families(httpx.get(f"{server.http_url}/metrics", timeout=10).text))
    counters = {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in families if f.type == "counter" for s in f.samples}
    return counters, {f.name: f.type for f in families if f.name.startswith("lmcache_tenant_")}


def test_no_counter_on_metrics_goes_backwards_when_tenants_change_rank(server: ServerProcess) -> None:
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, make_kv("LBHNC", "bfloat16"), model="tenants", mode="engine_driven")
        rng = random.Random(4)
        for i in range(11):  # more tenants than the top 10 /metrics shows one by one
            assert reg.store(_prompt(rng), range(32), salt=f"t{i}").stored == 2
        l1 = httpx.get(f"{server.http_url}/status", timeout=10).json()["l1"]
        chunk_gb = l1["used_bytes"] / l1["objects"] / (1 << 30)
        httpx.put(f"{server.http_url}/quota/late", json={"limit_gb": chunk_gb}, timeout=10).raise_for_status()
        for _ in range(10):  # it stores 20 chunks but holds 1: summed into tenant="other"
            reg.store(_prompt(rng), range(32), salt="late")
        httpx.delete(f"{server.http_url}/quota/late", timeout=10).raise_for_status()
        before, kinds = _counters(server)
        for _ in range(3):  # now it holds the most: into the top, out of "other"
            assert reg.store(_prompt(rng), range(32), salt="late").stored == 2
        after, _ = _counters(server)
    went_down = {k: (v, after[k]) for k, v in before.items() if k in after and after[k] < v}
    assert not went_down
    assert kinds and set(kinds.values()) == {"gauge"}, kinds
    assert any(k.startswith("lmcache_tenant_stored") for k in kinds)


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


def test_a_salt_no_request_could_carry_is_refused_and_breaks_nothing(server: ServerProcess) -> None:
    """JSON lets a body carry a lone surrogate, which no UTF-8 request can: refused, and /quota,
    /status and /metrics (which show every quota's tenant digest) go on answering."""
    http = server.http_url
    body = '{"salt": "\\ud800", "limit_gb": 0.0001}'
    r = httpx.put(f"{http}/quota/", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "valid Unicode" in r.json()["reason"]
    for path in ("/quota", "/status", "/metrics"):
        assert httpx.get(f"{http}{path}", timeout=10).status_code == 200, path
    assert httpx.get(f"{http}/quota", timeout=10).json()["quotas"] == []
    assert httpx.get(f"{http}/quota?other=1", timeout=10).status_code == 200  # names no salt: the list
