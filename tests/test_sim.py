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
