"""The HTTP admin app, called over real HTTP on a real server process."""

from __future__ import annotations

import httpx

from lmcache.client import MPClient
from lmcache.server.process import ServerProcess


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
    assert body["l1"]["eviction_policy"] == "LRU"
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
