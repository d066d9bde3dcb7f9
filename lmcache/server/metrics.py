"""Prometheus metrics of one server, every name prefixed ``lmcache_``.

Gauges are read from ``CacheEngine.status()`` at scrape time, so they can never drift from
what /status says; counters are incremented by the faces as requests pass.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from lmcache.server.engine import CacheEngine


class _EngineCollector(Collector):
    def __init__(self, engine: CacheEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        status = self._engine.status()
        server, l1 = status["server"], status["l1"]
        yield InfoMetricFamily(
            "lmcache_build", "Server version and id.",
            value={"version": server["version"], "server_id": server["server_id"]},
        )
        ready = 1.0 if server["state"] == "ready" else 0.0
        yield GaugeMetricFamily("lmcache_up", "1 while the engine is ready to serve.", value=ready)
        yield GaugeMetricFamily("lmcache_uptime_seconds", "Seconds since start.", value=server["uptime_seconds"])
        yield GaugeMetricFamily("lmcache_l1_capacity_bytes", "Size of the L1 pool.", value=l1["capacity_bytes"])
        yield GaugeMetricFamily("lmcache_l1_used_bytes", "Bytes of L1 held by objects.", value=l1["used_bytes"])
        yield GaugeMetricFamily("lmcache_l1_objects", "Objects in L1.", value=l1["objects"])
        yield GaugeMetricFamily("lmcache_registered_engines", "Registered KV caches.", value=len(status["engines"]))
        yield GaugeMetricFamily("lmcache_active_sessions", "Requests with server-side state.", value=status["sessions"]["active"])
        yield GaugeMetricFamily("lmcache_l1_allocated_bytes", "Bytes of L1 slots handed out.", value=l1["allocated_bytes"])
        yield GaugeMetricFamily("lmcache_l1_prefaulted_bytes", "Bytes of L1 made resident.", value=l1["prefaulted_bytes"])
        yield GaugeMetricFamily("lmcache_l1_writing_objects", "Objects being stored.", value=l1["writing"])
        yield GaugeMetricFamily("lmcache_l1_read_locked_objects", "Objects with read locks.", value=l1["read_locked"])
        for name, key, text in (
            ("lmcache_l1_hit_chunks", "hits", "Chunks found by lookups."),
            ("lmcache_l1_miss_chunks", "misses", "Chunks looked up and not found."),
            ("lmcache_l1_stored_chunks", "stored", "Chunks stored."),
            ("lmcache_l1_evictions", "evictions", "Objects evicted to make room."),
            ("lmcache_l1_skipped_stores", "skipped_stores", "Chunks not stored for lack of room."),
            ("lmcache_l1_expired_locks", "expired_locks", "Locks dropped after their TTL."),
            ("lmcache_l1_clears", "clears", "Times the cache was cleared."),
        ):
            yield CounterMetricFamily(name, text, value=l1[key])
        yield from _activity_metrics(status["activity"], self._engine.activity.histograms())
        yield from _l2_metrics(status["l2"])
        yield from _tenant_metrics(status["tenants"])


def _activity_metrics(activity: dict, histograms: dict[str, tuple[list[tuple[str, int]], float]]) -> Iterator[Metric]:
    for name, key, text in (
        ("lmcache_lookups", "lookups", "Lookups answered."),
        ("lmcache_lookup_tokens", "lookup_tokens", "Tokens (of whole chunks) lookups asked for."),
        ("lmcache_hit_tokens", "hit_tokens", "Tokens lookups found cached."),
        ("lmcache_stored_tokens", "stored_tokens", "Tokens stored."),
        ("lmcache_retrieved_tokens", "retrieved_tokens", "Tokens retrieved."),
        ("lmcache_stored_bytes", "stored_bytes", "Bytes of KV stored."),
        ("lmcache_retrieved_bytes", "retrieved_bytes", "Bytes of KV retrieved."),
    ):
        yield CounterMetricFamily(name, text, value=activity[key])
    for operation, (buckets, total_s) in histograms.items():
        yield HistogramMetricFamily(
            f"lmcache_{operation}_duration_seconds",
            f"Time per {operation}, from the request to its chunks being published or released.",
            buckets=buckets, sum_value=total_s,
        )


def _family(name: str, key: str, text: str, kind: type[GaugeMetricFamily] | type[CounterMetricFamily], labels: list[str],
            rows: list[tuple[list[str], dict]]) -> Metric:
    """One labelled family: a sample per row that has ``key`` (Redis tiers keep no capacity)."""
    family = kind(name, text, labels=labels)
    for values, row in rows:
        if row.get(key) is not None:
            family.add_metric(values, row[key])
    return family


def _tenant_metrics(tenants: dict) -> Iterator[Metric]:
    """Per tenant (a digest of its cache salt; "" without one), the top ones by bytes held and
    the rest summed as tenant="other": bounded however many salts there are.

    All of them are gauges, hits and stores too: they are not counters. tenant="other" sums a
    set of tenants that changes (it drops when one of them moves into the top), and a tenant's
    figures start again from 0 when its record is forgotten (no chunks left, no own quota).
    Exported as counters they went backwards, which Prometheus reads as a reset and turns
    rate() into nonsense."""
    rows = [(t["tenant"], t) for t in tenants["top"]]
    if tenants["others"]["tenants"]:
        rows.append(("other", tenants["others"]))
    for name, key, text in (
        ("lmcache_tenant_used_bytes", "used_bytes", "L1 bytes a tenant holds."),
        ("lmcache_tenant_objects", "objects", "L1 chunks a tenant holds."),
        ("lmcache_tenant_hit_chunks", "hits", "Chunks a tenant's lookups found since its record was made (may drop)."),
        ("lmcache_tenant_stored_chunks", "stored", "Chunks a tenant stored since its record was made (may drop)."),
        ("lmcache_tenant_quota_skipped_chunks", "quota_skipped",
         "Chunks not stored, the tenant's quota full, since its record was made (may drop)."),
    ):
        yield _family(name, key, text, GaugeMetricFamily, ["tenant"], [([tenant], row) for tenant, row in rows])


def _l2_metrics(l2: dict) -> Iterator[Metric]:
    """Per tier (labels: tier index and type) and for the L2 layer as a whole."""
    tiers = l2["tiers"]
    if not tiers:
        return
    labels = ["tier", "type"]
    for name, key, text, kind in (
        ("lmcache_l2_capacity_bytes", "capacity_bytes", "Capacity of the tier.", GaugeMetricFamily),
        ("lmcache_l2_used_bytes", "used_bytes", "Bytes the tier holds.", GaugeMetricFamily),
        ("lmcache_l2_objects", "objects", "Chunks the tier holds.", GaugeMetricFamily),
        ("lmcache_l2_written_bytes", "written_bytes", "Bytes written to the tier.", CounterMetricFamily),
        ("lmcache_l2_read_bytes", "read_bytes", "Bytes read from the tier.", CounterMetricFamily),
        ("lmcache_l2_hit_chunks", "hit_chunks", "Chunks loaded from the tier before a lookup answered.",
         CounterMetricFamily),
        ("lmcache_l2_miss_chunks", "misses", "Reads of chunks the tier did not have.", CounterMetricFamily),
        ("lmcache_l2_corrupt_chunks", "corrupt", "Damaged chunks found (deleted, never served).", CounterMetricFamily),
        ("lmcache_l2_evictions", "evictions", "Chunks the tier evicted to make room.", CounterMetricFamily),
        ("lmcache_l2_write_errors", "write_errors", "Failed writes.", CounterMetricFamily),
        ("lmcache_l2_present_chunks", "present_chunks", "Chunks a shared tier already held when asked before a write.",
         CounterMetricFamily),
        ("lmcache_l2_breaker_opened", "breaker_opened", "Times a network tier's circuit breaker opened.", CounterMetricFamily),
    ):
        yield _family(name, key, text, kind, labels, [([str(i), tier["type"]], tier) for i, tier in enumerate(tiers)])
    writable = GaugeMetricFamily("lmcache_l2_writable", "1 while the tier takes writes.", labels=labels)
    for i, tier in enumerate(tiers):
        writable.add_metric([str(i), tier["type"]], 1.0 if tier["state"] == "ok" else 0.0)
    yield writable
    yield GaugeMetricFamily("lmcache_l2_queue_bytes", "Bytes of chunks waiting to be written.", value=l2["queue_bytes"])
    for name, key, text in (
        ("lmcache_l2_dropped_writes", "dropped_writes", "Chunks left L1-only because the write queue was full."),
        ("lmcache_l2_expired_writes", "expired_writes", "Writes dropped because their L1 lock expired."),
        ("lmcache_l2_prefetched_chunks", "prefetched_chunks", "Chunks loaded from L2 into L1."),
        ("lmcache_l2_prefetch_deadline_expirations", "deadline_expired", "Lookups that answered before their loads landed."),
    ):
        yield CounterMetricFamily(name, text, value=l2[key])


class ServerMetrics:
    """One registry per server (not the process-global one), so tests can run several."""

    def __init__(self, engine: CacheEngine) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine))
        self.zmq_requests = Counter(
            "lmcache_zmq_requests", "ZMQ requests received, by message type.", ["message"],
            registry=self.registry,
        )
        self.zmq_errors = Counter(
            "lmcache_zmq_errors", "Error replies sent over ZMQ, by error code.", ["code"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "lmcache_http_requests", "HTTP admin requests, by route and status.", ["route", "status"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
