"""The simulator through its CLI: real server, real adapters, every loaded byte checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.workloads import KINDS, trace_chunk_keys

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
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


needs_traces = pytest.mark.skipif(not TRACES.exists(), reason="the shared traces are not next to this checkout")


@needs_traces
@pytest.mark.parametrize("trace", ["mooncake_conversation.jsonl", "mooncake_synthetic.jsonl"])
@pytest.mark.parametrize(
    ("mode", "layout", "engines"),
    [("engine_driven", "LBHNC", 1), ("lmcache_driven", "BLNHC", 2)],
)
def test_replay_matches_the_trace_byte_for_byte(tmp_path: Path, trace: str, mode: str, layout: str, engines: int) -> None:
    n = 60
    code, report, output = run_sim(tmp_path, "replay", str(TRACES / trace), "--requests", str(n),
                                   "--transfer-mode", mode, "--layout", layout, "--engines", str(engines))
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    assert report["requests"] == n
    assert report["hit_tokens"] == expected_hit_tokens(TRACES / trace, n)
    assert report["evictions"] == 0


@needs_traces
def test_a_small_l1_evicts_and_stays_correct(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "replay", str(TRACES / "mooncake_conversation.jsonl"),
                                   "--requests", "60", "--l1-size-gb", "0.002")
    assert code == 0, output
    assert report["evictions"] > 0
    assert report["mismatched_bytes"] == 0
    assert report["hit_tokens"] <= expected_hit_tokens(TRACES / "mooncake_conversation.jsonl", 60)


@pytest.mark.parametrize("kind", KINDS)
def test_every_synthetic_kind_is_byte_exact(tmp_path: Path, kind: str) -> None:
    code, report, output = run_sim(tmp_path, "synth", kind, "--requests", "16", "--prompt-tokens", "1024")
    assert code == 0, output
    assert report["mismatched_bytes"] == 0
    if kind == "repeat":
        assert report["hit_tokens"] == 8 * 3 * CHUNK  # each second prompt loads 3 of its 4 chunks
    elif kind == "random":
        assert report["hit_tokens"] == 0
    else:
        assert report["hit_tokens"] > 0


def test_a_corrupted_chunk_is_reported_and_fails_the_run(tmp_path: Path) -> None:
    code, report, output = run_sim(tmp_path, "synth", "repeat", "--requests", "4", "--prompt-tokens", "1024",
                                   "--test-corrupt-l1-after", "1")
    assert code == 1
    assert report["mismatched_bytes"] > 0
    assert "MISMATCH request s1 chunk 0" in output


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
         "--plot", str(plot), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(report.read_text())
    assert [r["l1_size_gb"] for r in rows] == [0.0002, 0.01]
    assert all(r["mismatched_bytes"] == 0 for r in rows)
    assert rows[0]["evictions"] > 0 and rows[1]["evictions"] == 0
    assert rows[0]["hit_rate"] < rows[1]["hit_rate"]
    assert rows[1]["hit_tokens"] == expected_hit_tokens(trace, 40)
