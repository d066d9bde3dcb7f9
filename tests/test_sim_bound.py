"""`python -m sim bound`: offline hit rates of each policy, Belady's MIN and unlimited memory.
It must agree with a replay through a real server (the same hit tokens and evictions for each
policy at the same L1 size, every byte checked), and the optimum must bound every policy.
"""

from __future__ import annotations

import pytest

from lmcache.config import EvictionPolicy
from sim.bound import bounds, capacity_chunks, trace_requests
from test_sim import CHUNK, TRACES, expected_hit_tokens, needs_traces, run_sim

TRACE = TRACES / "mooncake_conversation.jsonl"
REQUESTS = 200
TENTH = 0.004  # GB: 1,024 chunks of the tiny model, about a tenth of what 200 requests store


@needs_traces
@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_bound_agrees_with_a_byte_exact_replay_through_the_server(tmp_path, policy: EvictionPolicy) -> None:
    code, report, output = run_sim(tmp_path, "bound", str(TRACE), "--requests", str(REQUESTS),
                                   "--l1-size-gb", str(TENTH), "--eviction-policy", policy.value)
    assert code == 0, output
    offline = report[0][policy.value]
    code, replay, output = run_sim(tmp_path, "replay", str(TRACE), "--requests", str(REQUESTS), "--sequential",
                                   "--l1-size-gb", str(TENTH), "--eviction-policy", policy.value)
    assert code == 0 and replay["mismatched_bytes"] == 0, output
    assert replay["evictions"] > 0
    assert (replay["hit_tokens"], replay["evictions"]) == (offline["hit_tokens"], offline["evictions"])


@needs_traces
def test_belady_bounds_every_policy_and_unlimited_bounds_belady() -> None:
    requests = trace_requests(TRACE, CHUNK, REQUESTS)
    results = {b.policy: b for b in bounds(requests, capacity_chunks(TENTH, 4096), CHUNK, list(EvictionPolicy))}
    assert results["unlimited"].hit_tokens == expected_hit_tokens(TRACE, REQUESTS)
    for policy in EvictionPolicy:
        assert results[policy.value].hit_tokens <= results["Belady"].hit_tokens <= results["unlimited"].hit_tokens
    assert results["Belady"].hit_tokens > results["LRU"].hit_tokens  # a tenth is a policy problem, not only capacity


@needs_traces
def test_bound_skips_a_trace_prefix() -> None:
    whole = trace_requests(TRACE, CHUNK, 20)
    assert trace_requests(TRACE, CHUNK, 10, skip=10) == whole[10:]
