"""Ping round trips through the real server, next to a bare pyzmq DEALER/ROUTER echo.

The echo is the ceiling: a separate process whose ROUTER sends back every message as it
arrives, over the same loopback TCP, carrying the same frames. The two alternate round trip by
round trip, so both see the same machine (loopback latency on a small VM swings 3x between
quiet and busy periods); the ratio of their medians is the figure (goal: PING_GOAL below).

Start-up: from spawning `lmcache server` to its first Ping answer (goal: START_GOAL below), next
to spawning the bare echo process to its first echo.

    pytest benchmarks/bench_ping.py --benchmark-enable
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import zmq
from figures import at_most, below, interleaved

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


PING_GOAL = at_most(1.25, "x")  # ours / the bare echo; ../shared/DESIGN.md section 9 says it of a Lookup


def test_ping_round_trip_vs_bare_echo(benchmark, figures, echo_port: int) -> None:
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
        times = interleaved([client.ping, bare_echo], rounds=50 if benchmark.disabled else 10_000)
        ours, echo = (statistics.median(t) * 1e6 for t in times)
        benchmark.extra_info["echo_median_us"] = round(echo, 2)
        benchmark.extra_info["ping_median_us"] = round(ours, 2)
        benchmark.extra_info["ratio"] = round(ours / echo, 3)
        figures.record("Ping round trip, median", ours, "us", ceiling=("bare pyzmq echo", echo, "us"), goal=PING_GOAL)
        benchmark(client.ping)
    dealer.close(0)
    ctx.term()


def _echo_start_to_first_echo_s() -> float:
    """Seconds from spawning the bare echo process to its first answer (the start-up ceiling)."""
    port = free_port()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.DEVNULL)
    try:
        dealer.connect(f"tcp://127.0.0.1:{port}")  # zmq connects once the echo binds
        dealer.send_multipart([b"\x01\x00\x00\x00\x00\x00\x00\x00", p.encode(p.Ping())])
        assert dealer.poll(30_000), "the bare echo never answered"
        dealer.recv_multipart()
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        dealer.close(0)
        ctx.term()


START_GOAL = below(1, "s")  # at any L1 size; ../shared/DESIGN.md section 9


@pytest.mark.benchmark(group="start-to-first-ping")
@pytest.mark.parametrize("l1_size_gb", [0.25, 8.0])
def test_start_to_first_ping(benchmark, figures, l1_size_gb: float) -> None:
    """Seconds from spawning `lmcache server` to its first Ping answer (the pool is pre-faulted
    in the background)."""
    from lmcache.storage.memory import GIB, available_memory_bytes

    if l1_size_gb * GIB > available_memory_bytes() / 2:
        pytest.skip("not enough memory on this machine for this size")

    seconds: list[float] = []

    def start_and_ping() -> dict:
        start = time.perf_counter()
        with ServerProcess(l1_size_gb=l1_size_gb) as server, MPClient("127.0.0.1", server.port) as client:
            client.ping()
            seconds.append(time.perf_counter() - start)
            return client.status()["l1"]

    rounds = 1 if benchmark.disabled else 3
    l1 = benchmark.pedantic(start_and_ping, rounds=rounds)
    assert l1["capacity_bytes"] > 0
    echo = statistics.median(_echo_start_to_first_echo_s() for _ in range(rounds))
    figures.record(f"start to first Ping, {l1_size_gb:g} GB L1", statistics.median(seconds), "s",
                   ceiling=("bare echo process", echo, "s"), goal=START_GOAL)
