"""The run's figures for a reader: units, the model the KV was shaped after, what each figure means,
and warnings where a figure would mislead. The same figures, unrounded and unexplained, are what
--report writes as JSON for tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sim.budget import human_bytes
from sim.model import MODEL_SHAPES, ModelSpec

# Below this, a chunk's transfer costs more in per-call overhead (messages, locks, page walks) than
# in copying, so GB/s then measure calls a second, not bandwidth.
SMALL_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Setup:
    """What was simulated, as the summary names it."""

    model_shape: str  # the --model-shape preset (the spec says what overrides made of it)
    spec: ModelSpec
    chunk_size: int  # tokens, the server's
    engines: int
    ranks: int  # per engine
    asked: int  # --requests
    total: int  # requests the workload held, up to --requests (a trace may hold fewer)
    budget: int  # bytes of KV allowed (--memory-gb)

    @property
    def chunk_bytes(self) -> int:
        """One chunk of one rank."""
        return self.spec.block_bytes() * self.chunk_size // self.spec.block_size

    def model(self) -> str:
        s = self.spec
        per_token = s.block_bytes() // s.block_size
        preset = (s.layers, s.kv_heads, s.head_size, s.dtype) == MODEL_SHAPES.get(self.model_shape)
        name = self.model_shape if preset else f"{self.model_shape}, overridden"
        return (f"{name}: {s.layers} layer{'s' * (s.layers > 1)}, {s.kv_heads} KV head{'s' * (s.kv_heads > 1)}, "
                f"head size {s.head_size}, {s.dtype}: {human_bytes(per_token)} of KV per token per rank")


def _rate(gbps: float) -> str:
    return f"{gbps:.3g} GB/s"


def header(setup: Setup) -> list[str]:
    """What was simulated: the model, the chunk, the engines and their KV."""
    kv = setup.spec.num_blocks * setup.spec.block_bytes() * setup.engines * setup.ranks
    engines = f"{setup.engines} engine{'s' * (setup.engines > 1)} x {setup.ranks} rank{'s' * (setup.ranks > 1)}"
    return [
        f"model    {setup.model()}",
        f"chunk    {setup.chunk_size} tokens = {human_bytes(setup.chunk_bytes)} per rank (what the server stores as one object)",
        f"engines  {engines}, {setup.spec.num_blocks} KV blocks a rank: {human_bytes(kv)} of KV in all "
        f"(budget {human_bytes(setup.budget)}, --memory-gb)",
    ]


def rows(result: dict[str, Any], setup: Setup) -> list[tuple[str, str, str]]:
    """(figure, value with its unit, what it means)."""
    r = result
    tiers = ", ".join(f"{tier} {tokens}" for tier, tokens in r.get("hit_tokens_by_tier", {}).items())
    return [
        ("requests", f"{r['finished_requests']} of {setup.total}", "requests played to the end"),
        ("hit rate", f"{r['hit_rate']:.1%}", f"of prompt tokens loaded from the server, not computed "
         f"({r['hit_tokens']} of {r['prompt_tokens']} tokens; by tier: {tiers or 'none'})"),
        ("local hits", f"{r['local_hit_tokens']} tokens", "found in the engines' own prefix cache"),
        ("stored", f"{r['stored_chunks']} chunks, {human_bytes(r['bytes_stored'])}", "sent to the server (bytes: "
         "every rank's)"),
        ("retrieved", f"{r['retrieved_chunks']} chunks, {human_bytes(r['bytes_retrieved'])}", "loaded from the "
         "server (bytes: every rank's)"),
        ("store", _rate(r["store_gbps"]), "bytes stored / time the I/O threads spent storing (GB = 1e9 B)"),
        ("retrieve", _rate(r["retrieve_gbps"]), "bytes retrieved / time the I/O threads spent loading"),
        ("memcpy", _rate(r["memcpy_gbps"]), "a plain copy of 16 chunks on this machine, for scale"),
        ("lookup", f"p50 {r['lookup_p50_ms']:.2f} ms, p99 {r['lookup_p99_ms']:.2f} ms", "from a Lookup sent to "
         "its answer taken in by the scheduler (once a step)"),
        ("evictions", f"{r['evictions']} chunks", "evicted from the server's L1 during the run"),
        ("mismatched", f"{r['mismatched_bytes']} B", "loaded bytes that differ from the forward pass (must be 0)"),
        ("truncated", f"{r['truncated_requests']} requests", "prompts cut to fit the engines' blocks"),
        ("steps", f"{r['steps']}, largest batch {r['max_batch']}", "scheduler steps, and the most requests one "
         "step computed"),
        ("wall time", f"{r['wall_seconds']:.2f} s", "from the first request to the last (or the interrupt)"),
    ]


def warnings(result: dict[str, Any], setup: Setup) -> list[str]:
    r = result
    found = []
    if r.get("interrupted"):
        found.append(f"warning: interrupted: a partial report of the {r['requests']} requests that had started "
                     f"({r['finished_requests']} finished)")
    if r.get("unreported_ranks"):
        found.append(f"warning: {r['unreported_ranks']} rank(s) were stopped before they said what they moved: the "
                     "stored and retrieved bytes and GB/s leave them out")
    if setup.total < setup.asked:
        found.append(f"warning: the trace held only {setup.total} requests, fewer than --requests {setup.asked}")
    if setup.chunk_bytes < SMALL_CHUNK_BYTES and (r["bytes_stored"] or r["bytes_retrieved"]):
        found.append(f"warning: a chunk is only {human_bytes(setup.chunk_bytes)} per rank, so store and retrieve GB/s "
                     f"measure per-chunk overhead, not bandwidth (memcpy: {_rate(r['memcpy_gbps'])}); for bandwidth, "
                     f"use chunks of {human_bytes(SMALL_CHUNK_BYTES)} or more (e.g. --model-shape llama-8b)")
    if r["truncated_requests"]:
        found.append(f"warning: {r['truncated_requests']} prompts were cut to {(setup.spec.num_blocks - 2) * setup.spec.block_size} "
                     "tokens to fit the engines' blocks: raise --num-blocks or --memory-gb")
    if r["mismatched_bytes"]:
        found.append(f"error: {r['mismatched_bytes']} loaded bytes differ from what the forward pass wrote (MISMATCH "
                     "lines below): the run fails")
    return found


def lines(result: dict[str, Any], setup: Setup, report_path: str | None) -> list[str]:
    """The summary, one string a line."""
    table = rows(result, setup)
    width = max(len(v) for _, v, _ in table)
    where = f"written to {report_path}" if report_path else "--report FILE writes them"
    out = [f"LMCache simulation summary (every figure, unrounded, as JSON: {where})"]
    out += [f"  {line}" for line in header(setup)]
    out += [f"  {name:<12}{value:<{width}}  {meaning}" for name, value, meaning in table]
    return out + warnings(result, setup)
