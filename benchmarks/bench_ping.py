"""Ping round trips through the real server, next to a bare pyzmq DEALER/ROUTER echo.

The echo is the ceiling: a separate process whose ROUTER sends back every message as it
arrives, over the same loopback TCP, carrying the same frames. The two alternate round trip by
round trip, so both see the same machine (loopback latency on a small VM swings 3x between
quiet and busy periods); the ratio of their medians is the figure. Goal: <= 1.25.

    pytest benchmarks/bench_ping.py --benchmark-enable -s
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from lmcache import protocol as p
from lmcache.client import MPClient
from lmcache.server.process import ServerProcess, free_port

ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
router.bind(f"tcp://127.0.0.1:{sys.argv[1]}")
print("ready", flush=True)
while True:
    router.send_multipart(router.recv_multipart())
"""


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield port
    proc.kill()
    proc.wait()


def _interleaved_medians_us(a: Callable[[], object], b: Callable[[], object], n: int) -> tuple[float, float]:
    times_a, times_b = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        times_a.append(t1 - t0)
        times_b.append(t2 - t1)
    return statistics.median(times_a) * 1e6, statistics.median(times_b) * 1e6


def test_ping_round_trip_vs_bare_echo(benchmark, echo_port: int) -> None:
    frame = p.encode(p.Ping())
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{echo_port}")

    def bare_echo() -> None:
        dealer.send_multipart([b"\x01\x00\x00\x00\x00\x00\x00\x00", frame])
        dealer.recv_multipart()

    with ServerProcess() as server, MPClient("127.0.0.1", server.port) as client:
        assert client.ping() == p.Pong()
        bare_echo()  # both connections established before timing
        n = 50 if benchmark.disabled else 10_000
        ours, echo = _interleaved_medians_us(client.ping, bare_echo, n)
        benchmark.extra_info["echo_median_us"] = round(echo, 2)
        benchmark.extra_info["ping_median_us"] = round(ours, 2)
        benchmark.extra_info["ratio"] = round(ours / echo, 3)
        print(f"\nping median {ours:.1f} us, bare echo median {echo:.1f} us, ratio {ours / echo:.3f} (goal <= 1.25)")
        benchmark(client.ping)
    dealer.close(0)
    ctx.term()


@pytest.mark.benchmark(group="start-to-first-ping")
@pytest.mark.parametrize("l1_size_gb", [0.25, 8.0])
def test_start_to_first_ping(benchmark, l1_size_gb: float) -> None:
    """Seconds from spawning `lmcache server` to its first Ping answer (goal: < 1 s at any size;
    the pool is pre-faulted in the background)."""
    from lmcache.storage.memory import GIB, available_memory_bytes

    if l1_size_gb * GIB > available_memory_bytes() / 2:
        pytest.skip("not enough memory on this machine for this size")

    def start_and_ping() -> dict:
        with ServerProcess(l1_size_gb=l1_size_gb) as server, MPClient("127.0.0.1", server.port) as client:
            client.ping()
            return client.status()["l1"]

    l1 = benchmark.pedantic(start_and_ping, rounds=1 if benchmark.disabled else 3)
    assert l1["capacity_bytes"] > 0
