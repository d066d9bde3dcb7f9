"""L2 through the simulator: real servers on a real disk directory, every loaded byte checked.

Warm restarts (after SIGTERM, and after SIGKILL once the write queue drained) serve what the
first server stored; an L1 a tenth of the working set, over a disk that holds it all, keeps
the hit rate of an unlimited L1.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from lmcache.server.process import ServerProcess
from test_sim import TRACES, expected_hit_tokens, needs_traces, run_sim

TRACE = TRACES / "mooncake_conversation.jsonl"


def _adapter(path: Path) -> str:
    return f'{{"type": "disk", "path": "{path}", "max_gb": 2}}'


def _replay(tmp_path: Path, requests: int, *extra: str) -> dict:
    code, report, output = run_sim(tmp_path, "replay", str(TRACE), "--requests", str(requests), "--sequential", *extra)
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    return report


@needs_traces
def test_a_restarted_server_serves_the_first_ones_disk(tmp_path: Path) -> None:
    disk = tmp_path / "l2"
    first = _replay(tmp_path, 120, "--l2-adapter", _adapter(disk))
    assert first["hit_tokens"] == expected_hit_tokens(TRACE, 120)
    again = _replay(tmp_path, 120, "--l2-adapter", _adapter(disk))  # a new server, an empty L1
    assert again["hit_tokens"] >= 0.95 * first["hit_tokens"]
    assert again["hit_tokens_by_tier"]["l2[0]:disk"] > 0


def _status(server: ServerProcess) -> dict:
    return httpx.get(f"{server.http_url}/status", timeout=10).json()


@needs_traces
def test_a_killed_server_leaves_a_disk_the_next_one_serves(tmp_path: Path) -> None:
    disk = tmp_path / "l2"
    args = ["--l2-adapter", _adapter(disk)]
    with ServerProcess(l1_size_gb=0.5, extra_args=args) as server:
        first = _replay(tmp_path, 80, "--host", "127.0.0.1", "--port", str(server.port))
        deadline = time.monotonic() + 60
        while True:  # the write queue drains: every chunk in L1 is on disk
            status = _status(server)
            if status["l2"]["queue_chunks"] == 0 and status["l2"]["tiers"][0]["objects"] >= status["l1"]["objects"]:
                break
            assert time.monotonic() < deadline, status["l2"]
            time.sleep(0.05)
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
    with ServerProcess(l1_size_gb=0.5, extra_args=args) as server:
        again = _replay(tmp_path, 80, "--host", "127.0.0.1", "--port", str(server.port))
    assert first["hit_tokens"] > 0 and again["hit_tokens"] >= 0.95 * first["hit_tokens"]


@needs_traces
@pytest.mark.parametrize("requests", [400])
def test_a_tenth_of_the_working_set_in_l1_over_disk_keeps_the_hit_rate(tmp_path: Path, requests: int) -> None:
    unlimited = expected_hit_tokens(TRACE, requests)
    # The tiny model's chunk is 4 KiB; the first 400 requests store about 21k chunks (84 MB).
    report = _replay(tmp_path, requests, "--l1-size-gb", "0.008", "--l2-adapter", _adapter(tmp_path / "l2"))
    assert report["evictions"] > 0  # L1 alone could not have held it
    assert report["hit_tokens"] >= unlimited - 0.01 * report["prompt_tokens"]
