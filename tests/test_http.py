"""The HTTP admin app, called over real HTTP on a real server process."""

from __future__ import annotations

import httpx
import torch

from lmcache.client import MPClient
from lmcache.keys import prompt_hashes
from lmcache.kv_transfer import register_kv_caches
from lmcache.server.process import ServerProcess
from lmcache.testing.vllm_like import KVShape, make_kv


def test_healthcheck_is_healthy(http: httpx.Client) -> None:
    r = http.get("/healthcheck")
    assert r.status_code == 200
    assert r.json() == {"status": "healthy"}


def test_status_reports_capacity_engines_sessions_and_config(http: httpx.Client, server: ServerProcess) -> None:
    r = http.get("/status")
    assert r.status_code == 200
    body = r.json()
    assert body["server"]["state"] == "ready"
    assert body["l1"]["capacity_bytes"] == int(0.25 * (1 << 30))
    assert body["l1"]["used_bytes"] + body["l1"]["free_bytes"] == body["l1"]["capacity_bytes"]
    assert body["l1"]["eviction_policy"] == "2Q-LONG"  # the default
    assert body["engines"] == []
    assert body["sessions"] == {"active": 0}
    assert body["config"]["port"] == server.port
    assert body["config"]["http_port"] == server.http_port
    assert body["config"]["chunk_size"] == 256


def test_clear_cache_answers_ok_and_is_counted(http: httpx.Client) -> None:
    before = http.get("/status").json()["l1"]["clears"]
    r = http.post("/clear-cache")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert http.get("/status").json()["l1"]["clears"] == before + 1


def test_metrics_are_prometheus_text_with_lmcache_prefix(http: httpx.Client) -> None:
    http.get("/healthcheck")
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = [line for line in r.text.splitlines() if line and not line.startswith("#")]
    assert samples
    assert all(line.startswith("lmcache_") for line in samples), samples
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in samples}
    assert values["lmcache_up"] == 1.0
    assert values["lmcache_l1_capacity_bytes"] == int(0.25 * (1 << 30))
    assert values['lmcache_http_requests_total{route="/healthcheck",status="200"}'] >= 1


def test_metrics_count_zmq_requests(http: httpx.Client, client: MPClient) -> None:
    def pings() -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith('lmcache_zmq_requests_total{message="Ping"}'):
                return float(line.split()[-1])
        return 0.0

    before = pings()
    for _ in range(3):
        client.ping()
    assert pings() == before + 3


def test_unknown_route_is_404_json(http: httpx.Client) -> None:
    r = http.get("/no-such-route")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == "error"
    assert r.json()["path"] == "/no-such-route"


def test_wrong_method_is_405_json(http: httpx.Client) -> None:
    for method, path in (("POST", "/status"), ("GET", "/clear-cache"), ("DELETE", "/healthcheck")):
        r = http.request(method, path)
        assert r.status_code == 405, (method, path)
        assert r.json()["status"] == "error"
        assert r.json()["method"] == method


def test_status_and_metrics_show_hit_rates_bytes_and_latency_histograms(http: httpx.Client, client: MPClient) -> None:
    kv = make_kv("LBHNC", "bfloat16")
    for t in kv:
        t.copy_(torch.randn(t.shape))
    stored = [t.clone() for t in kv]
    chunk_bytes = sum(t.nbytes for t in kv) // KVShape().blocks * (256 // KVShape().block_size)
    reg = register_kv_caches(client, kv, model="activity", mode="engine_driven")
    before = http.get("/status").json()
    prompt = prompt_hashes(list(range(1000, 1512)), 256)  # two chunks
    assert reg.store(prompt, range(32)).stored == 2
    assert client.lookup(reg.scope(), prompt + prompt_hashes(list(range(9000, 9256)), 256)) == 2  # 2 of 3 found
    for t in kv:
        t.zero_()
    assert reg.retrieve(prompt, range(32)).retrieved == 2
    assert all(torch.equal(a, b) for a, b in zip(kv, stored, strict=True))
    body = http.get("/status").json()
    now, was = body["activity"], before["activity"]
    assert now["lookups"] == was["lookups"] + 1
    assert now["hit_tokens"] - was["hit_tokens"] == 512 and now["lookup_tokens"] - was["lookup_tokens"] == 768
    assert now["stored_bytes"] - was["stored_bytes"] == 2 * chunk_bytes
    assert now["retrieved_bytes"] - was["retrieved_bytes"] == 2 * chunk_bytes
    assert now["stored_tokens"] - was["stored_tokens"] == 512 and now["retrieved_tokens"] - was["retrieved_tokens"] == 512
    assert 0 < now["token_hit_rate"] <= 1 and 0 < body["l1"]["hit_rate"] <= 1
    for op in ("lookup", "store", "retrieve"):
        assert now["latency"][op]["count"] == was["latency"][op]["count"] + 1 and now["latency"][op]["mean_ms"] > 0

    values = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["lmcache_stored_bytes_total"] == now["stored_bytes"]
    assert values["lmcache_hit_tokens_total"] == now["hit_tokens"]
    for op in ("lookup", "store", "retrieve"):
        count = values[f"lmcache_{op}_duration_seconds_count"]
        assert count == now["latency"][op]["count"]
        assert values[f'lmcache_{op}_duration_seconds_bucket{{le="+Inf"}}'] == count
        assert values[f"lmcache_{op}_duration_seconds_sum"] > 0
        buckets = [v for k, v in values.items() if k.startswith(f"lmcache_{op}_duration_seconds_bucket")]
        assert buckets == sorted(buckets)  # cumulative
