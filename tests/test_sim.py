"""The simulator through its CLI: real server, real adapters, every loaded byte checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.workloads import KINDS, trace_chunk_keys

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "sim" / "traces"
CHUNK = 256


def run_sim(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    report = tmp_path / f"report-{abs(hash(args))}.json"
    out = subprocess.run([sys.executable, "-m", "sim", *args, "--report", str(report)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    data = json.loads(report.read_text()) if report.exists() else {}
    return out.returncode, data, out.stdout + out.stderr


def expected_hit_tokens(trace: Path, requests: int) -> int:
    """What a sequential replay with a big enough L1 must load: leading chunks seen before, but
    never the whole prompt."""
    seen: set[tuple] = set()
    total = 0
    for length, keys in trace_chunk_keys(trace, CHUNK, requests):
        lead = 0
        while lead < len(keys) and keys[lead] in seen:
            lead += 1
        total += min(lead, (length - 1) // CHUNK) * CHUNK
        seen.update(keys)
    return total


needs_traces = pytest.mark.skipif(not TRACES.exists(), reason="sim/traces is missing from this checkout")


@needs_traces
@pytest.mark.parametrize("trace", ["mooncake_conversation.jsonl", "mooncake_synthetic.jsonl"])
@pytest.mark.parametrize(
    ("mode", "layout", "engines", "engine_mode"),
    [("engine_driven", "LBHNC", 1, "tp"), ("lmcache_driven", "BLNHC", 2, "tp"),
     ("engine_driven", "BLHNC", 2, "instances")],
)
def test_replay_matches_the_trace_byte_for_byte(
    tmp_path: Path, trace: str, mode: str, layout: str, engines: int, engine_mode: str
) -> None:
    n = 60
    code, report, output = run_sim(tmp_path, "replay", str(TRACES / trace), "--requests", str(n), "--sequential",
                                   "--transfer-mode", mode, "--layout", layout, "--engines", str(engines),
                                   "--engine-mode", engine_mode)
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    assert report["requests"] == n
    assert report["hit_tokens"] == expected_hit_tokens(TRACES / trace, n)
    assert report["retrieved_chunks"] == report["hit_tokens"] // CHUNK
    assert report["evictions"] == 0
    assert report["max_batch"] == 1


@needs_traces
def test_a_small_l1_evicts_and_stays_correct(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "replay", str(TRACES / "mooncake_conversation.jsonl"),
                                   "--requests", "60", "--sequential", "--l1-size-gb", "0.002")
    assert code == 0, output
    assert report["evictions"] > 0
    assert report["mismatched_bytes"] == 0
    assert report["hit_tokens"] <= expected_hit_tokens(TRACES / "mooncake_conversation.jsonl", 60)


@needs_traces
def test_arrivals_at_trace_times_run_in_bounded_batches(tmp_path: Path) -> None:
    """Requests arrive at the trace's timestamps (here 1000x faster) and overlap: a request may
    look up before an earlier one has stored, so it can only hit less than one at a time does."""
    trace = TRACES / "mooncake_conversation.jsonl"
    code, report, output = run_sim(tmp_path, "replay", str(trace), "--requests", "80", "--speed", "1000",
                                   "--engines", "2", "--engine-mode", "instances", "--max-num-seqs", "4",
                                   "--max-num-batched-tokens", "4096", "--max-output-tokens", "8")
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    assert report["requests"] == 80
    assert 1 < report["max_batch"] <= 4
    assert 0 < report["hit_tokens"] <= expected_hit_tokens(trace, 80)


@needs_traces
def test_a_local_prefix_cache_takes_what_it_holds_and_the_server_the_rest(tmp_path: Path) -> None:
    """Two instances with their own prefix caches: each finds its own earlier turns locally and
    the other instance's through the server; together they find what the trace repeats."""
    trace = TRACES / "mooncake_conversation.jsonl"
    code, report, output = run_sim(tmp_path, "replay", str(trace), "--requests", "60", "--sequential",
                                   "--engines", "2", "--engine-mode", "instances", "--enable-prefix-caching")
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    assert report["truncated_requests"] == 0
    assert report["local_hit_tokens"] > 0 and report["hit_tokens"] > 0
    assert report["local_hit_tokens"] + report["hit_tokens"] >= expected_hit_tokens(trace, 60)


@pytest.mark.parametrize("kind", KINDS)
def test_every_synthetic_kind_is_byte_exact(tmp_path: Path, kind: str) -> None:
    code, report, output = run_sim(tmp_path, "synth", kind, "--requests", "16", "--prompt-tokens", "1024",
                                   "--sequential")
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    if kind == "repeat":
        assert report["hit_tokens"] == 8 * 3 * CHUNK  # each second prompt loads 3 of its 4 chunks
    elif kind == "random":
        assert report["hit_tokens"] == 0
    else:
        assert report["hit_tokens"] > 0


def test_synthetic_traffic_overlapping_on_two_ranks(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "synth", "system-prompt", "--requests", "24", "--prompt-tokens", "1024",
                                   "--rate", "2000", "--engines", "2", "--transfer-mode", "engine_driven",
                                   "--layout", "LBNHC", "--block-size", "32")
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    assert report["max_batch"] > 1
    assert report["hit_tokens"] > 0


def test_an_explicit_model_shape_sizes_the_chunks(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "synth", "repeat", "--requests", "4", "--prompt-tokens", "1024",
                                   "--sequential", "--layers", "3", "--kv-heads", "2", "--head-size", "8",
                                   "--dtype", "float32")
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    per_token = 3 * 2 * 2 * 8 * 4  # layers x heads x (K and V) x head size x float32
    assert report["bytes_stored"] == report["stored_chunks"] * CHUNK * per_token
    assert report["bytes_retrieved"] == 2 * 3 * CHUNK * per_token


def test_with_its_own_prefix_cache_an_engine_does_not_ask_for_what_it_holds(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "synth", "repeat", "--requests", "16", "--prompt-tokens", "1024",
                                   "--sequential", "--enable-prefix-caching")
    assert code == 0, output
    assert report["hit_tokens"] == 0
    assert report["local_hit_tokens"] == 8 * (1023 // 16) * 16


def test_a_corrupted_chunk_is_reported_and_fails_the_run(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "synth", "repeat", "--requests", "4", "--prompt-tokens", "1024",
                                   "--sequential", "--test-corrupt-l1-after", "1")
    assert code == 1
    assert report["mismatched_bytes"] > 0
    assert "MISMATCH request s1 chunk 0" in output


def test_bad_options_are_refused_in_one_line(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "synth", "repeat", "--engine-mode", "pipeline")
    assert code == 2
    assert "--engine-mode" in output and "tp, instances" in output
    assert report == {}


def make_trace(path: Path, requests: int = 40) -> Path:
    """A small trace in the Mooncake format: conversations that share growing prefixes."""
    import random

    rng = random.Random(0)
    next_id, conversations, lines = 0, [], []
    for i in range(requests):
        if not conversations or rng.random() < 0.3:
            conversations.append([])
        conv = conversations[rng.randrange(len(conversations))]
        for _ in range(rng.randint(1, 3)):
            conv.append(next_id)
            next_id += 1
        length = 512 * len(conv) - rng.randrange(0, 400)
        lines.append(json.dumps({"timestamp": i * 100, "input_length": length, "output_length": 10, "hash_ids": list(conv)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_writes_a_plot_and_hit_rates_that_grow_with_l1(tmp_path: Path) -> None:
    trace = make_trace(tmp_path / "trace.jsonl")
    plot = tmp_path / "hit-rate.png"
    report = tmp_path / "sweep.json"
    out = subprocess.run(
        [sys.executable, "-m", "sim", "sweep", str(trace), "--requests", "40", "--l1-size-gb", "0.0002,0.01",
         "--eviction-policy", "lru,S3FIFO", "--plot", str(plot), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image  # matplotlib's own dependency

    with Image.open(plot) as png:  # the title names the model and the chunk the hit rates were measured with
        assert "40 requests, tiny model, 256-token chunks of 4.0 KiB" in png.text["Title"]
    every = json.loads(report.read_text())
    assert [r["policy"] for r in every] == ["LRU", "LRU", "S3FIFO", "S3FIFO", "Belady", "unlimited", "Belady", "unlimited"]
    for size in (0.0002, 0.01):  # the optimum bounds every policy at every size
        at = {r["policy"]: r["hit_tokens"] for r in every if r["l1_size_gb"] == size}
        assert max(at["LRU"], at["S3FIFO"]) <= at["Belady"] <= at["unlimited"] == expected_hit_tokens(trace, 40)
    assert all(r["mismatched_bytes"] == 0 for r in every)
    rows = [r for r in every if r["policy"] == "LRU"]
    assert [r["l1_size_gb"] for r in rows] == [0.0002, 0.01]
    assert all(r["mismatched_bytes"] == 0 for r in rows)
    assert rows[0]["evictions"] > 0 and rows[1]["evictions"] == 0
    assert rows[0]["hit_rate"] < rows[1]["hit_rate"]
    assert rows[1]["hit_tokens"] == expected_hit_tokens(trace, 40)


def test_it_can_play_against_a_server_that_is_already_running(tmp_path: Path) -> None:
    from lmcache.client import MPClient
    from lmcache.server.process import ServerProcess

    with ServerProcess() as server:
        code, report, output = run_sim(tmp_path, "synth", "repeat", "--requests", "4", "--prompt-tokens", "1024",
                                       "--sequential", "--host", "127.0.0.1", "--port", str(server.port))
        assert code == 0, output
        assert report["mismatched_bytes"] == 0 and report["hit_tokens"] == 2 * 3 * CHUNK
        with MPClient("127.0.0.1", server.port, timeout_s=10) as client:
            assert client.status()["l1"]["objects"] == 2 * 4  # what the simulator stored stays
