"""L2 on Redis: the tier shared by a fleet of servers. Every Redis here is a real ``redis-server``
(Debian's package) on a free loopback port, started and stopped by these tests; every lmcache
server is a real process, and every byte the simulator loads is checked.

What it must show: chunks stored through one server are hits on another (two and three servers,
one Redis; and across a 3-node cluster, with keys on every node); keys already in Redis are not
sent again; values damaged by hand are misses, never wrong bytes; tenants never cross; a Redis
that hangs, dies, is not up yet or is full never fails a request, and the server reconnects.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from test_l2 import _payload, _until
from test_sim import CHUNK, TRACES, run_sim

from lmcache.config import ConfigError, L2AdapterConfig
from lmcache.keys import CacheScope
from lmcache.server.process import ServerProcess, free_port, lmcache_command
from lmcache.storage.l2 import chunk_file
from lmcache.storage.l2.redis_tier import RedisTier
from lmcache.storage.l2.tier import Outgoing, TierClearError
from lmcache.testing.redis_servers import MISSING, REDIS_SERVER, RedisClusterNodes, RedisServer
from sim.workloads import trace_chunk_keys

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason=MISSING)
TRACE = TRACES / "mooncake_conversation.jsonl"
SCOPE = CacheScope("m", 1, 0, "fmt/a", "")
TENANT_B = CacheScope("m", 1, 0, "fmt/a", "tenant-b")
SCOPE_KEY = chunk_file.scope_id(SCOPE)


# --- configuration ----------------------------------------------------------------------------


def test_redis_adapters_parse_and_never_show_a_password() -> None:
    one = L2AdapterConfig.parse('{"type": "redis", "url": "redis://:s3cret@cache:6379/2", "namespace": "prod", '
                                '"connections": 4, "timeout_ms": 250}')
    assert (one.type, one.url, one.namespace, one.connections, one.timeout_ms) == (
        "redis", "redis://:s3cret@cache:6379/2", "prod", 4, 250.0)
    assert "s3cret" not in json.dumps(one.as_dict())
    cluster = L2AdapterConfig.parse('{"type": "redis-cluster", "nodes": ["10.0.0.1:7000", "10.0.0.2:7000"]}')
    assert cluster.nodes == ("10.0.0.1:7000", "10.0.0.2:7000") and cluster.namespace == "default"
    assert L2AdapterConfig.parse('{"type": "redis-cluster", "url": "redis://10.0.0.1:7000"}').nodes == ("10.0.0.1:7000",)


@pytest.mark.parametrize("spec", [
    '{"type": "redis"}',
    '{"type": "redis", "url": "http://cache:6379"}',
    '{"type": "redis", "url": "redis://cache:port"}',
    '{"type": "redis", "url": "redis://cache:6379", "namespace": "a{b}"}',
    '{"type": "redis", "url": "redis://cache:6379", "namespace": ""}',
    '{"type": "redis", "url": "redis://cache:6379", "connections": 0}',
    '{"type": "redis", "url": "redis://cache:6379", "timeout_ms": 0}',
    '{"type": "redis", "url": "redis://cache:6379", "path": "/tmp"}',
    '{"type": "redis-cluster", "nodes": "cache:7000"}',
    '{"type": "redis-cluster", "nodes": ["cache"]}',
    '{"type": "memcached", "url": "x"}',
])
def test_bad_redis_adapters_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        L2AdapterConfig.parse(spec)
    assert e.value.field == "l2_adapters"


def test_a_bad_redis_adapter_is_one_line_and_exit_2() -> None:
    out = subprocess.run([*lmcache_command(), "server", "--l1-size-gb", "0.01", "--l2-adapter",
                          '{"type": "redis", "url": "redis://h:6379", "connections": -1}'],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and '"connections" must be a whole number' in out.stderr
    assert "Traceback" not in out.stderr


# --- the tier on its own, against a real Redis ---------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path):
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    with RedisServer(tmp_path / "redis") as server:
        yield server


def _tier(url: str, timeout_s: float = 2.0) -> RedisTier:
    tier = RedisTier("redis", url, (), "test", 4, timeout_s, timeout_s)
    return tier


def _connected(tier: RedisTier) -> RedisTier:
    _until(tier.breaker.allows, "the tier to connect")
    return tier


def _chunk(scope: CacheScope, i: int, payload: bytes | bytearray, valid: Callable[[], bool] = lambda: True) -> Outgoing:
    return Outgoing(scope, chunk_file.scope_id(scope), bytes([i]) * 16, CHUNK, memoryview(payload), valid)


def test_chunks_round_trip_with_flat_keys_and_are_written_once(redis_server: RedisServer) -> None:
    tier = _connected(_tier(redis_server.url))
    try:
        chunks = [_chunk(SCOPE, i, _payload(i)) for i in range(3)]
        assert tier.put_many(chunks) == [True] * 3
        keys = sorted(redis_server.client().keys("*"))
        assert len(keys) == 3 and all(k.startswith(b"lmcache:test:v1:") for k in keys)
        assert not any(b"{" in k or b"}" in k for k in keys)  # no hash tags: spread over cluster slots
        assert tier.held(chunks[0].scope_key, [c.chunk_hash for c in chunks] + [b"\x09" * 16]) == [4096] * 3 + [None]
        for i, c in enumerate(chunks):
            into = bytearray(4096)
            assert tier.get(c.scope_key, c.chunk_hash, memoryview(into)) and bytes(into) == _payload(i)
        sets = _calls(redis_server, "set")
        assert tier.put_many(chunks) == [True] * 3  # already there: asked, not sent
        assert _calls(redis_server, "set") == sets and tier.counters.present_chunks == 3
        assert tier.counters.written_chunks == 3 and tier.counters.read_chunks == 3
    finally:
        tier.close()


def _calls(server: RedisServer, command: str) -> int:
    return int(server.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_chunk_whose_lock_expired_under_the_send_is_deleted(redis_server: RedisServer) -> None:
    tier = _connected(_tier(redis_server.url))
    try:
        asked: list[int] = []

        def valid() -> bool:  # valid once the checksum is taken, expired once the bytes are sent
            asked.append(1)
            return len(asked) < 2

        assert tier.put_many([_chunk(SCOPE, 1, _payload(1), valid)]) == [False]
        assert len(asked) == 2 and redis_server.client().dbsize() == 0
    finally:
        tier.close()


def _damage(kind: str, raw: bytes) -> bytes:
    header, payload = raw[: chunk_file.HEADER_BYTES], raw[chunk_file.HEADER_BYTES:]
    if kind == "magic":
        return b"XXXX" + raw[4:]
    if kind == "scope":  # a header of another scope (another model, format or tenant)
        return chunk_file.pack(CHUNK, chunk_file.scope_id(TENANT_B), raw[40:56], payload) + payload
    if kind == "checksum":
        return header + bytes([payload[0] ^ 1]) + payload[1:]
    if kind == "size":
        return header + payload[:-16]
    if kind == "short":
        return raw[:40]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["magic", "scope", "checksum", "size", "short", "wrong_type"])
def test_a_value_damaged_by_hand_is_a_miss_and_is_deleted(redis_server: RedisServer, kind: str) -> None:
    tier = _connected(_tier(redis_server.url))
    try:
        chunk = _chunk(SCOPE, 1, _payload(1))
        assert tier.put_many([chunk]) == [True]
        client = redis_server.client()
        (key,) = client.keys("*")
        if kind == "wrong_type":
            client.delete(key)
            client.hset(key, "a", "b")
        else:
            client.set(key, _damage(kind, client.get(key)))
        into = bytearray(4096)
        assert not tier.get(chunk.scope_key, chunk.chunk_hash, memoryview(into))
        assert bytes(into) != _payload(1)  # nothing of it reached the slot
        assert client.exists(key) == 0 and tier.counters.corrupt == 1
        assert tier.put_many([chunk]) == [True]  # the next store writes it again
        assert tier.get(chunk.scope_key, chunk.chunk_hash, memoryview(into)) and bytes(into) == _payload(1)
    finally:
        tier.close()


def test_tenants_never_cross_through_redis(redis_server: RedisServer) -> None:
    tier = _connected(_tier(redis_server.url))
    try:
        a, b = _chunk(SCOPE, 1, _payload(1)), _chunk(TENANT_B, 1, _payload(2))  # the same tokens, two salts
        assert a.chunk_hash == b.chunk_hash and a.scope_key != b.scope_key
        assert tier.put_many([a]) == [True]
        assert tier.held(b.scope_key, [b.chunk_hash]) == [None]
        assert not tier.get(b.scope_key, b.chunk_hash, memoryview(bytearray(4096)))
        assert tier.put_many([b]) == [True] and redis_server.client().dbsize() == 2
        for chunk, seed in ((a, 1), (b, 2)):
            into = bytearray(4096)
            assert tier.get(chunk.scope_key, chunk.chunk_hash, memoryview(into)) and bytes(into) == _payload(seed)
    finally:
        tier.close()


def test_the_breaker_skips_a_hung_or_dead_redis_and_reconnects(tmp_path: Path) -> None:
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    server = RedisServer(tmp_path / "redis")
    tier = _tier(server.url, timeout_s=0.2)  # Redis is not up yet: the tier starts anyway
    try:
        assert tier.status()["state"] == "connecting" and not tier.writable
        chunk = _chunk(SCOPE, 1, _payload(1))
        assert tier.held(chunk.scope_key, [chunk.chunk_hash]) == [None] and tier.counters.skipped_calls == 1
        server.start()
        _until(tier.breaker.allows, "the first connection")
        assert tier.put_many([chunk]) == [True]

        server.pause()  # hung: every call times out
        for _ in range(10):
            if not tier.breaker.allows():
                break
            tier.held(chunk.scope_key, [chunk.chunk_hash])
        status = tier.status()
        assert status["state"] == "open" and status["breaker_opened"] == 1 and status["retry_in_s"] is not None
        skipped = tier.counters.skipped_calls
        assert tier.held(chunk.scope_key, [chunk.chunk_hash]) == [None]  # open: not even tried
        assert tier.counters.skipped_calls == skipped + 1
        server.resume()
        _until(tier.breaker.allows, "the breaker to close after SIGCONT")
        assert tier.held(chunk.scope_key, [chunk.chunk_hash]) == [4096]

        server.kill()  # dead: refused connections
        for _ in range(10):
            if not tier.breaker.allows():
                break
            tier.get(chunk.scope_key, chunk.chunk_hash, memoryview(bytearray(4096)))
        assert tier.status()["state"] == "open"
        server.start()  # the same port, empty (persistence is off)
        _until(tier.breaker.allows, "the breaker to close after a restart")
        assert tier.put_many([chunk]) == [True] and tier.held(chunk.scope_key, [chunk.chunk_hash]) == [4096]
    finally:
        tier.close()
        server.stop()


class _NotRedis:
    """A TCP endpoint that takes RESP commands and answers each with ``reply(command)``: a
    fault, not a stand-in for Redis (every test of what Redis does uses a real one)."""

    def __init__(self, reply: Callable[[bytes, socket.socket], None]) -> None:
        self._reply = reply
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self.commands: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while line := reader.readline():
                args = []
                for _ in range(int(line[1:])):  # *<n>, then $<len> and the bytes of each
                    size = int(reader.readline()[1:])
                    args.append(reader.read(size + 2)[:size])
                self.commands.append(args[0].upper())
                self._reply(args[0].upper(), conn)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._listener.close()


def test_an_endpoint_that_is_not_redis_is_a_miss_and_the_breakers_business() -> None:
    # It answers PING, and +OK to everything else (HELLO included): redis-py then fails in its
    # own parsing, with errors that are not RedisError. None of them may leave the tier.
    endpoint = _NotRedis(lambda command, conn: conn.sendall(b"+PONG\r\n" if command == b"PING" else b"+OK\r\n"))
    tier = _tier(endpoint.url, timeout_s=0.5)
    try:
        chunk = _chunk(SCOPE, 1, _payload(1))
        tried = 0
        deadline = time.monotonic() + 20
        while tried < 5:  # calls that got through the breaker and reached the endpoint
            assert time.monotonic() < deadline, "the breaker never let a call through"
            if tier.breaker.allows():
                tried += 1
            assert tier.held(chunk.scope_key, [chunk.chunk_hash]) in ([None], [-1])
            assert tier.put_many([chunk]) == [False]
            assert tier.get(chunk.scope_key, chunk.chunk_hash, memoryview(bytearray(4096))) is False
            with pytest.raises(TierClearError):
                tier.clear()
            time.sleep(0.01)
        assert tier.status()["last_error"]  # the breaker saw them
    finally:
        tier.close()
        endpoint.close()


def test_closing_the_tier_ends_a_read_that_redis_trickles() -> None:
    # A byte every 0.2 s never trips a 0.5 s socket timeout; shutdown must not wait for it.
    asked = threading.Event()

    def trickle(command: bytes, conn: socket.socket) -> None:
        if command != b"GET":
            conn.sendall(b"+PONG\r\n" if command == b"PING" else b"+OK\r\n")
            return
        asked.set()
        conn.sendall(b"$4176\r\n")
        for _ in range(4178):
            time.sleep(0.2)
            conn.sendall(b"\0")

    endpoint = _NotRedis(trickle)
    tier = _connected(_tier(endpoint.url, timeout_s=0.5))
    got: list[bool] = []
    reader = threading.Thread(target=lambda: got.append(tier.get(SCOPE_KEY, b"\1" * 16, memoryview(bytearray(4096)))))
    try:
        reader.start()
        assert asked.wait(10), "the GET never reached the endpoint"
        tier.close()
        reader.join(10)
        assert not reader.is_alive() and got == [False]
    finally:
        tier.close()
        endpoint.close()


# --- servers sharing one Redis, through the simulator -----------------------------------------


def _expected_hits(skip: int, requests: int) -> int:
    """What one shared server would load for requests skip .. skip+requests of a sequential
    replay: leading chunks seen before, in this slice or the ones before it."""
    seen: set[tuple] = set()
    total = 0
    for i, (length, keys) in enumerate(trace_chunk_keys(TRACE, CHUNK, skip + requests)):
        lead = 0
        while lead < len(keys) and keys[lead] in seen:
            lead += 1
        if i >= skip:
            total += min(lead, (length - 1) // CHUNK) * CHUNK
        seen.update(keys)
    return total


def _adapter(spec: dict) -> list[str]:
    return ["--l2-adapter", json.dumps(spec), "--l2-prefetch-deadline-ms", "5000"]


def _status(server: ServerProcess) -> dict:
    return httpx.get(f"{server.http_url}/status", timeout=10).json()


def _redis_tier(server: ServerProcess) -> dict:
    return next(t for t in _status(server)["l2"]["tiers"] if t["type"].startswith("redis"))


def _play(tmp_path: Path, server: ServerProcess, skip: int, requests: int) -> dict:
    _until(lambda: _redis_tier(server)["state"] == "ok", "the server to reach Redis")
    code, report, output = run_sim(tmp_path, "replay", str(TRACE), "--skip", str(skip), "--requests", str(requests),
                                   "--sequential", "--host", "127.0.0.1", "--port", str(server.port))
    assert code == 0 and report["mismatched_bytes"] == 0, output
    assert report["requests"] == requests
    # Written through before the next server plays: the queue is empty and nothing was dropped.
    _until(lambda: _status(server)["l2"]["queue_chunks"] == 0, "the write queue to drain")
    assert _status(server)["l2"]["dropped_writes"] == 0
    return report


def _share(tmp_path: Path, spec: dict, servers: int, requests: int) -> list[dict]:
    """Each server plays its slice of the trace after the one before it; returns their reports."""
    reports = []
    per = requests // servers
    for i in range(servers):
        with ServerProcess(l1_size_gb=0.5, extra_args=_adapter(spec)) as server:
            reports.append(_play(tmp_path, server, i * per, per))
    for i, report in enumerate(reports[1:], start=1):
        expected = _expected_hits(i * per, per)
        assert report["hit_tokens"] >= 0.95 * expected, (i, report["hit_tokens"], expected)
        assert report["hit_tokens_by_tier"]["l2[0]:" + spec["type"]] > 0
    return reports


@needs_redis
@pytest.mark.parametrize("servers", [2, 3])
def test_servers_on_one_redis_share_what_each_stored(tmp_path: Path, redis_server: RedisServer, servers: int) -> None:
    _share(tmp_path, {"type": "redis", "url": redis_server.url, "namespace": "fleet"}, servers, 120)


@needs_redis
def test_servers_on_a_three_node_cluster_share_and_spread_the_keys(tmp_path: Path) -> None:
    with RedisClusterNodes(tmp_path / "cluster") as cluster:
        _share(tmp_path, {"type": "redis-cluster", "nodes": cluster.seeds[:1]}, 2, 80)
        sizes = [node.client().dbsize() for node in cluster.nodes]
        assert all(n > 0 for n in sizes), sizes
        assert min(sizes) > 0.2 * sum(sizes), sizes  # even: no hash tags pile keys on one node


@needs_redis
def test_a_full_redis_evicts_and_the_servers_keep_serving(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru") as redis_server:
        spec = {"type": "redis", "url": redis_server.url}
        with ServerProcess(l1_size_gb=0.5, extra_args=_adapter(spec)) as server:
            _play(tmp_path, server, 0, 60)  # about 11 MB of chunks into 4 MB
            assert _redis_tier(server)["write_errors"] == 0
        assert int(redis_server.client().info("stats")["evicted_keys"]) > 0
        with ServerProcess(l1_size_gb=0.5, extra_args=_adapter(spec)) as server:
            report = _play(tmp_path, server, 0, 60)  # what Redis kept is served, the rest recomputed
            assert report["hit_tokens_by_tier"]["l2[0]:redis"] < _expected_hits(0, 60)


@needs_redis
def test_redis_hung_killed_and_restarted_mid_run_fails_no_request(tmp_path: Path) -> None:
    port = free_port()
    redis_server = RedisServer(tmp_path / "redis", port=port)
    spec = {"type": "redis", "url": redis_server.url, "timeout_ms": 300}
    requests = 600
    try:
        # Redis is not up when the server starts: it starts anyway, and serves from L1.
        with ServerProcess(l1_size_gb=0.5, extra_args=["--l2-adapter", json.dumps(spec)]) as server:
            assert _redis_tier(server)["state"] == "connecting"
            redis_server.start()
            _until(lambda: _redis_tier(server)["state"] == "ok", "the first connection")
            result: dict = {}
            sim = threading.Thread(target=lambda: result.update(zip(
                ("code", "report", "output"),
                run_sim(tmp_path, "replay", str(TRACE), "--requests", str(requests), "--sequential",
                        "--host", "127.0.0.1", "--port", str(server.port)),
                strict=True,
            )))
            sim.start()
            try:
                _until(lambda: _redis_tier(server)["written_chunks"] > 0, "the first writes")
                redis_server.pause()  # hung
                _until(lambda: _redis_tier(server)["state"] == "open", "the breaker to open on a hung Redis")
                redis_server.resume()
                _until(lambda: _redis_tier(server)["state"] == "ok", "a reconnect after SIGCONT")
                redis_server.kill()  # dead
                _until(lambda: _redis_tier(server)["state"] == "open", "the breaker to open on a dead Redis")
                redis_server.start()
                _until(lambda: _redis_tier(server)["state"] == "ok", "a reconnect after a restart")
                assert sim.is_alive(), "the run ended before the faults: make it longer"
            finally:
                sim.join(600)
            assert result["code"] == 0, result["output"]
            report = result["report"]
            assert report["requests"] == requests and report["mismatched_bytes"] == 0
            tier = _redis_tier(server)
            assert tier["breaker_opened"] >= 2 and tier["written_chunks"] > 0
            assert httpx.get(f"{server.http_url}/healthcheck", timeout=10).status_code == 200
    finally:
        redis_server.stop()


@needs_redis
def test_clear_cache_all_tiers_empties_the_namespace_only_and_says_when_it_could_not(
        tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set("someone-else", "keeps this")
    spec = {"type": "redis", "url": redis_server.url, "namespace": "mine", "timeout_ms": 200}
    with ServerProcess(l1_size_gb=0.5, extra_args=_adapter(spec)) as server:
        _play(tmp_path, server, 0, 10)
        stored = client.dbsize()
        assert stored > 1
        # Redis hung: the clear cannot reach it, and the answer must say so (that KV would be
        # served again once Redis is back).
        redis_server.pause()
        try:
            r = httpx.post(f"{server.http_url}/clear-cache", params={"tier": "all"}, timeout=30)
        finally:
            redis_server.resume()
        assert r.status_code == 503 and "redis tier" in r.json()["reason"], r.text
        assert client.dbsize() == stored
        assert _status(server)["l1"]["objects"] == 0  # L1 was cleared all the same
        _until(lambda: _redis_tier(server)["state"] == "ok", "the breaker to close again", timeout=30)
        r = httpx.post(f"{server.http_url}/clear-cache", params={"tier": "all"}, timeout=30)
        assert r.status_code == 200, r.text
        assert client.keys("*") == [b"someone-else"]
        metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
        assert 'lmcache_l2_writable{tier="0",type="redis"} 1.0' in metrics


def test_the_simulator_refuses_a_negative_skip(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "sim", "replay", str(TRACE), "--skip", "-1"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert out.returncode == 2 and "--skip" in out.stderr


@needs_redis
def test_disk_then_redis_lookups_ask_the_disk_first_and_stores_go_to_both(tmp_path: Path, redis_server: RedisServer) -> None:
    redis_spec = json.dumps({"type": "redis", "url": redis_server.url})

    def tiers(disk: Path) -> list[str]:
        return ["--l2-adapter", json.dumps({"type": "disk", "path": str(disk), "max_gb": 1}), "--l2-adapter", redis_spec,
                "--l2-prefetch-deadline-ms", "5000"]

    with ServerProcess(l1_size_gb=0.5, extra_args=tiers(tmp_path / "disk-a")) as server:
        _play(tmp_path, server, 0, 40)
        disk, shared = _status(server)["l2"]["tiers"]
        assert disk["written_chunks"] == shared["written_chunks"] > 0
    # A server on another machine (its own empty disk): Redis serves it.
    with ServerProcess(l1_size_gb=0.5, extra_args=tiers(tmp_path / "disk-b")) as server:
        report = _play(tmp_path, server, 0, 40)
        assert report["hit_tokens_by_tier"]["l2[1]:redis"] > 0 and report["hit_tokens_by_tier"]["l2[0]:disk"] == 0
    # The first server again: its disk answers first, Redis is not read.
    with ServerProcess(l1_size_gb=0.5, extra_args=tiers(tmp_path / "disk-a")) as server:
        report = _play(tmp_path, server, 0, 40)
        assert report["hit_tokens_by_tier"]["l2[0]:disk"] > 0 and report["hit_tokens_by_tier"]["l2[1]:redis"] == 0
        assert _status(server)["l2"]["tiers"][1]["read_chunks"] == 0
