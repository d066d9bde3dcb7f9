"""Runs a workload through simulated engines against a server and sums up what happened."""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmcache.kv_transfer import TransferStats
from sim.engine import SimEngine
from sim.worker import Mismatch
from sim.workloads import SimRequest


@dataclass(frozen=True)
class Pacing:
    sequential: bool  # one request at a time, each after the previous one's stores are done
    speed: float  # otherwise: arrivals at the workload's timestamps, this many times faster
    corrupt_after: int = 0  # test only: scribble on L1 before dispatching request number N + 1
    server_pid: int | None = None


def play(source: Iterable[SimRequest], engines: list[SimEngine], pacing: Pacing,
         progress: Callable[[int], None]) -> float:
    """Plays every request; returns the wall time. Requests go to the engines in turn.
    ``progress`` is called on every turn of the loop with the requests finished since the last."""
    requests = iter(source)
    upcoming = next(requests, None)
    first_arrival = upcoming.arrival_s if upcoming else 0.0
    start = time.perf_counter()
    dispatched = 0
    while upcoming is not None or any(e.busy() for e in engines):
        now = time.perf_counter() - start
        while upcoming is not None:
            if pacing.corrupt_after and dispatched == pacing.corrupt_after and pacing.server_pid:
                if any(e.busy() for e in engines):
                    break  # the earlier requests' stores must be in L1 before it is spoilt
                scribble_on_l1(pacing.server_pid)
                pacing = Pacing(pacing.sequential, pacing.speed)
            if pacing.sequential:
                if any(e.busy() for e in engines):
                    break
            elif (upcoming.arrival_s - first_arrival) / pacing.speed > now:
                break
            engines[dispatched % len(engines)].add(upcoming.req_id, upcoming.tokens, upcoming.output_tokens)
            dispatched += 1
            upcoming = next(requests, None)
            if pacing.sequential:
                break
        busy = [e for e in engines if e.busy()]
        progress(0)  # a turn with nothing finished still lets a progress line come on time
        if not busy:
            if upcoming is not None:  # the simulated clock: nothing to do until the next arrival
                due = (upcoming.arrival_s - first_arrival) / pacing.speed
                time.sleep(max(0.0, min(0.05, due - (time.perf_counter() - start))))
            continue
        for e in busy:
            e.begin_step()
        for e in busy:
            done = len(e.end_step())
            if done:
                progress(done)
    return time.perf_counter() - start


class ProgressLines:
    """Counts finished requests, and writes a line every ``every_s`` seconds (0: never): requests
    done of the total, the hit rate so far. A line, not a bar, so that logs read the same."""

    def __init__(self, engines: list[SimEngine], total: int, every_s: float, write: Callable[[str], None]) -> None:
        self.engines, self.total, self.every_s, self.write = engines, total, every_s, write
        self.done = 0
        self.started = time.monotonic()
        self._next = self.started + every_s

    def __call__(self, finished: int) -> None:
        self.done += finished
        now = time.monotonic()
        if self.every_s > 0 and now >= self._next:
            self._next = now + self.every_s
            self.write(self.line(now))

    def line(self, now: float) -> str:
        prompt = sum(e.stats.prompt_tokens for e in self.engines)
        hits = sum(e.stats.hit_tokens for e in self.engines)
        return (f"progress: {self.done}/{self.total} requests done, hit rate {hits / max(1, prompt):.1%} so far, "
                f"{now - self.started:.0f} s")


def scribble_on_l1(server_pid: int) -> None:
    """Test-only: overwrite the server's L1 arena so the next loads must be caught as wrong."""
    with open(f"/dev/shm/lmcache_l1_{server_pid}", "r+b") as f, mmap.mmap(f.fileno(), 0) as arena:
        noise = b"\xa5" * (1 << 20)
        for offset in range(0, len(arena), len(noise)):
            end = min(offset + len(noise), len(arena))
            arena[offset:end] = noise[: end - offset]


def memcpy_gbps(nbytes: int) -> float:
    """A plain copy of ``nbytes`` on this machine now, to set the figures against."""
    src, dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def report(engines: list[SimEngine], transfers: list[list[TransferStats]], wall: float, evictions: int) -> dict[str, Any]:
    """The run in figures. Bytes count every rank; the GB/s divide them by the time the I/O
    threads spent moving them (ranks of one engine move at the same time: their slowest counts)."""
    stats = [e.stats for e in engines]
    chunk_bytes = [e.spec.block_bytes() * (e.chunk_size // e.spec.block_size) for e in engines]
    bytes_stored = sum(t.stored_chunks * cb for ts, cb in zip(transfers, chunk_bytes, strict=True) for t in ts)
    bytes_retrieved = sum(t.retrieved_chunks * cb for ts, cb in zip(transfers, chunk_bytes, strict=True) for t in ts)
    store_s = sum(max(t.store_seconds for t in ts) for ts in transfers)
    retrieve_s = sum(max(t.retrieve_seconds for t in ts) for ts in transfers)
    lookups = sorted(ms for s in stats for ms in s.lookup_ms) or [0.0]
    prompt_tokens = sum(s.prompt_tokens for s in stats)
    hit_tokens = sum(s.hit_tokens for s in stats)
    return {
        "requests": sum(s.requests for s in stats),
        "prompt_tokens": prompt_tokens,
        "hit_tokens": hit_tokens,
        "hit_rate": hit_tokens / max(1, prompt_tokens),
        "local_hit_tokens": sum(s.local_hit_tokens for s in stats),
        "stored_chunks": sum(ts[0].stored_chunks for ts in transfers),
        "retrieved_chunks": sum(ts[0].retrieved_chunks for ts in transfers),
        "bytes_stored": bytes_stored,
        "bytes_retrieved": bytes_retrieved,
        "mismatched_bytes": sum(m.bytes for s in stats for m in s.mismatches),
        "evictions": evictions,
        "truncated_requests": sum(s.truncated for s in stats),
        "steps": sum(s.steps for s in stats),
        "max_batch": max(s.max_batch for s in stats),
        "lookup_p50_ms": statistics.median(lookups),
        "lookup_p99_ms": lookups[min(len(lookups) - 1, int(len(lookups) * 0.99))],
        "store_gbps": bytes_stored / store_s / 1e9 if store_s else 0.0,
        "retrieve_gbps": bytes_retrieved / retrieve_s / 1e9 if retrieve_s else 0.0,
        "wall_seconds": wall,
    }


def mismatches(engines: list[SimEngine]) -> list[Mismatch]:
    return [m for e in engines for m in e.stats.mismatches]
