"""What the server has done, for /status and /metrics: how long lookups, stores and retrieves
took (histograms), how many bytes and tokens moved, and how many of the tokens asked for were
found.

The engine records here once per operation, on its hot paths, so recording is a few additions
under one lock; everything derived (rates, cumulative buckets) is computed when read.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any

# Upper bounds in seconds: a lookup takes tens of microseconds, a large store tens of milliseconds.
LATENCY_BUCKETS_S = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
OPERATIONS = ("lookup", "store", "retrieve")


class _Latency:
    """One histogram: a count per bucket (the last one unbounded) and the sum."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total_s += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or under it), as Prometheus wants them."""
        out, running = [], 0
        for bound, n in zip((*map(str, LATENCY_BUCKETS_S), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def summary(self) -> dict[str, Any]:
        count = sum(self.counts)
        return {"count": count, "mean_ms": round(1000 * self.total_s / count, 4) if count else None}


class Activity:
    def __init__(self, chunk_size: int) -> None:
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._latency = {op: _Latency() for op in OPERATIONS}
        self._lookups = 0
        self._asked_chunks = 0
        self._hit_chunks = 0
        self._chunks = {"store": 0, "retrieve": 0}
        self._bytes = {"store": 0, "retrieve": 0}

    def looked_up(self, asked_chunks: int, hit_chunks: int, seconds: float) -> None:
        with self._lock:
            self._lookups += 1
            self._asked_chunks += asked_chunks
            self._hit_chunks += hit_chunks
            self._latency["lookup"].observe(seconds)

    def moved(self, operation: str, chunks: int, nbytes: int, seconds: float) -> None:
        """``chunks`` of ``nbytes`` in all were stored or retrieved (``operation``) in ``seconds``."""
        with self._lock:
            self._chunks[operation] += chunks
            self._bytes[operation] += nbytes
            self._latency[operation].observe(seconds)

    def histograms(self) -> dict[str, tuple[list[tuple[str, int]], float]]:
        """Per operation: cumulative buckets and the sum of seconds."""
        with self._lock:
            return {op: (h.cumulative(), h.total_s) for op, h in self._latency.items()}

    def snapshot(self) -> dict[str, Any]:
        """JSON-able, for /status."""
        with self._lock:
            latency = {op: h.summary() for op, h in self._latency.items()}
            asked, hit = self._asked_chunks, self._hit_chunks
            chunks, nbytes, lookups = dict(self._chunks), dict(self._bytes), self._lookups
        tokens = self._chunk_size
        return {
            "lookups": lookups,
            "lookup_tokens": asked * tokens,
            "hit_tokens": hit * tokens,
            # Of the whole chunks lookups asked for, the share found (vLLM may ask again for a
            # prompt while its first lookup is pending: each asking counts).
            "token_hit_rate": round(hit / asked, 4) if asked else None,
            "stored_tokens": chunks["store"] * tokens,
            "retrieved_tokens": chunks["retrieve"] * tokens,
            "stored_bytes": nbytes["store"],
            "retrieved_bytes": nbytes["retrieve"],
            "latency": latency,
        }
