"""`python -m sim`: replay real or synthetic vLLM traffic against a live LMCache server.

    python -m sim replay ../shared/traces/mooncake_conversation.jsonl --requests 2000 --l1-size-gb 4
    python -m sim synth repeat --requests 20 --prompt-tokens 4096 --model-shape llama-8b

It starts its own server (or uses one with --host/--port), drives the connector's real adapters
in vLLM's order, one request at a time, checks every loaded byte, and exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import mmap
import statistics
import sys
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmcache.client import MPClient
from lmcache.config import ConnectorConfig
from lmcache.server.process import ServerProcess
from sim.engine import LAYOUTS, MODEL_SHAPES, SimEngine
from sim.workloads import KINDS, SimRequest, mooncake, synthetic

app = typer.Typer(help="Replay vLLM traffic against a live LMCache server, byte-verified.",
                  add_completion=False, no_args_is_help=True, rich_markup_mode=None)
console = Console(stderr=True)


def _options(
    requests: int, l1_size_gb: float, eviction_policy: str, chunk_size: int, host: str | None, port: int | None,
    engines: int, layout: str, block_size: int, model_shape: str, num_blocks: int, transfer_mode: str,
    report: Path | None, corrupt_after: int,
) -> dict[str, Any]:
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"must be one of {', '.join(LAYOUTS)}", param_hint="'--layout'")
    if model_shape not in MODEL_SHAPES:
        raise typer.BadParameter(f"must be one of {', '.join(MODEL_SHAPES)}", param_hint="'--model-shape'")
    return dict(locals())


Requests = Annotated[int, typer.Option("--requests", help="How many requests to play.")]
L1 = Annotated[float, typer.Option("--l1-size-gb", help="L1 size of the server the simulator starts.")]
Policy = Annotated[str, typer.Option("--eviction-policy", help="Eviction policy of that server.")]
Chunk = Annotated[int, typer.Option("--chunk-size", help="Chunk size of that server.")]
Host = Annotated[str | None, typer.Option("--host", help="Use a running server at this host instead.")]
Port = Annotated[int | None, typer.Option("--port", help="... and this ZMQ port.")]
Engines = Annotated[int, typer.Option("--engines", help="Engine ranks (tensor-parallel workers of one model).")]
Layout = Annotated[str, typer.Option("--layout", help=f"KV layout: {', '.join(LAYOUTS)}.")]
BlockSize = Annotated[int, typer.Option("--block-size", help="Tokens per KV block.")]
Shape = Annotated[str, typer.Option("--model-shape", help=f"Model preset: {', '.join(MODEL_SHAPES)}.")]
Blocks = Annotated[int, typer.Option("--num-blocks", help="KV blocks per engine (longer prompts are cut).")]
Mode = Annotated[str, typer.Option("--transfer-mode", help="auto, engine_driven or lmcache_driven.")]
Report = Annotated[Path | None, typer.Option("--report", help="Write a JSON report here.")]
Corrupt = Annotated[int, typer.Option("--test-corrupt-l1-after", hidden=True, help="Test only: scribble on L1 after N requests.")]


@app.command()
def replay(
    trace: Annotated[Path, typer.Argument(help="A Mooncake JSONL trace.", exists=True, dir_okay=False)],
    requests: Requests = 1000, l1_size_gb: L1 = 1.0, eviction_policy: Policy = "LRU", chunk_size: Chunk = 256,
    host: Host = None, port: Port = None, engines: Engines = 1, layout: Layout = "LBHNC",
    block_size: BlockSize = 16, model_shape: Shape = "tiny", num_blocks: Blocks = 8192,
    transfer_mode: Mode = "auto", report: Report = None, test_corrupt_l1_after: Corrupt = 0,
) -> None:
    """Replay a Mooncake trace (hash ids become deterministic tokens), one request at a time."""
    opts = _options(requests, l1_size_gb, eviction_policy, chunk_size, host, port, engines, layout, block_size,
                    model_shape, num_blocks, transfer_mode, report, test_corrupt_l1_after)
    sys.exit(_exit_status(_run(mooncake(trace, requests), requests, opts)))


@app.command()
def synth(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(KINDS)}.")],
    requests: Requests = 100, prompt_tokens: Annotated[int, typer.Option("--prompt-tokens")] = 2048,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    l1_size_gb: L1 = 1.0, eviction_policy: Policy = "LRU", chunk_size: Chunk = 256,
    host: Host = None, port: Port = None, engines: Engines = 1, layout: Layout = "LBHNC",
    block_size: BlockSize = 16, model_shape: Shape = "tiny", num_blocks: Blocks = 8192,
    transfer_mode: Mode = "auto", report: Report = None, test_corrupt_l1_after: Corrupt = 0,
) -> None:
    """Play a synthetic workload: chat, system-prompt, rag, random or repeat."""
    if kind not in KINDS:
        raise typer.BadParameter(f"must be one of {', '.join(KINDS)}", param_hint="'KIND'")
    opts = _options(requests, l1_size_gb, eviction_policy, chunk_size, host, port, engines, layout, block_size,
                    model_shape, num_blocks, transfer_mode, report, test_corrupt_l1_after)
    sys.exit(_exit_status(_run(synthetic(kind, requests, prompt_tokens, seed), requests, opts)))


@app.command()
def sweep(
    trace: Annotated[Path, typer.Argument(help="A Mooncake JSONL trace.", exists=True, dir_okay=False)],
    l1_size_gb: Annotated[str, typer.Option("--l1-size-gb", help="Comma-separated L1 sizes in GB.")] = "0.01,0.03,0.1,0.3,1",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of hit rate against L1 size.")] = None,
    requests: Requests = 1000, eviction_policy: Policy = "LRU", chunk_size: Chunk = 256, layout: Layout = "LBHNC",
    block_size: BlockSize = 16, model_shape: Shape = "tiny", num_blocks: Blocks = 8192,
    transfer_mode: Mode = "auto", report: Report = None,
) -> None:
    """Replay a trace once per L1 size: the hit rate an operator gets for each size of server."""
    try:
        sizes = [float(x) for x in l1_size_gb.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("must be comma-separated numbers, e.g. 1,2,4", param_hint="'--l1-size-gb'") from None
    rows = []
    for size in sizes:
        opts = _options(requests, size, eviction_policy, chunk_size, None, None, 1, layout, block_size,
                        model_shape, num_blocks, transfer_mode, None, 0)
        result = _run(mooncake(trace, requests), requests, opts)
        rows.append({"l1_size_gb": size, **result})
        if result["mismatched_bytes"]:
            break
    if report is not None:
        report.write_text(json.dumps(rows, indent=2))
    if plot is not None:
        _plot(rows, plot, trace.name)
    table = Table(title=f"hit rate by L1 size: {trace.name}, {requests} requests")
    for column in ("L1 GB", "hit rate", "evictions", "mismatched bytes"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['l1_size_gb']:g}", f"{row['hit_rate']:.1%}", str(row["evictions"]), str(row["mismatched_bytes"]))
    console.print(table)
    sys.exit(_exit_status(*rows))


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["l1_size_gb"] for r in rows], [100 * r["hit_rate"] for r in rows], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("L1 size (GB)")
    ax.set_ylabel("hit rate (% of prompt tokens)")
    ax.set_title(f"LMCache hit rate: {title}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _exit_status(*results: dict[str, Any]) -> int:
    return 1 if any(r["mismatched_bytes"] for r in results) else 0


def _run(source: Iterable[SimRequest], total: int, o: dict[str, Any]) -> dict[str, Any]:
    with ExitStack() as stack:
        server = None
        if o["port"] is None:
            server = stack.enter_context(ServerProcess(
                l1_size_gb=o["l1_size_gb"],
                extra_args=["--chunk-size", str(o["chunk_size"]), "--eviction-policy", o["eviction_policy"]],
            ))
            host, port = "127.0.0.1", server.port
        else:
            host, port = o["host"] or "localhost", o["port"]
        config = ConnectorConfig(host=f"tcp://{host}", port=port, mp_transfer_mode=o["transfer_mode"],
                                 lookup_wait_ms=50, timeout_s=60)
        with MPClient(host, port, timeout_s=10) as client:
            chunk = client.hello().chunk_size
            before = client.status()["l1"]
        engine = SimEngine(config, f"sim-{o['model_shape']}", o["model_shape"], o["layout"], o["block_size"],
                           o["num_blocks"], o["engines"])
        start = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("hit rate {task.fields[hit]:.1%}"), console=console, transient=False) as bar:
            task = bar.add_task("replaying", total=total, hit=0.0)
            for i, req in enumerate(source):
                engine.run(req.req_id, req.tokens, chunk)
                stats = engine.stats
                bar.update(task, advance=1, hit=stats.hit_tokens / max(1, stats.prompt_tokens))
                if o["corrupt_after"] and i + 1 == o["corrupt_after"] and server is not None:
                    _scribble_on_l1(server.proc.pid)
        wall = time.perf_counter() - start
        engine.close()
        with MPClient(host, port, timeout_s=10) as client:
            after = client.status()["l1"]
    result = _report(engine.stats, wall, after["evictions"] - before["evictions"])
    result["memcpy_gbps"] = _memcpy_gbps(engine.chunk_bytes(chunk) * 16)  # the ceiling, this run
    _print(result, engine.stats)
    if o["report"] is not None:
        o["report"].write_text(json.dumps(result, indent=2))
    return result


def _memcpy_gbps(nbytes: int) -> float:
    """A plain copy of ``nbytes`` on this machine now, to set the figures against."""
    import numpy as np

    src, dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _scribble_on_l1(server_pid: int) -> None:
    """Test-only: overwrite the server's L1 arena so the next loads must be caught as wrong."""
    with open(f"/dev/shm/lmcache_l1_{server_pid}", "r+b") as f, mmap.mmap(f.fileno(), 0) as arena:
        noise = b"\xa5" * (1 << 20)
        for offset in range(0, len(arena), len(noise)):
            end = min(offset + len(noise), len(arena))
            arena[offset:end] = noise[: end - offset]


def _report(s, wall: float, evictions: int) -> dict[str, Any]:
    lookups = sorted(s.lookup_ms) or [0.0]
    return {
        "requests": s.requests,
        "prompt_tokens": s.prompt_tokens,
        "hit_tokens": s.hit_tokens,
        "hit_rate": s.hit_tokens / max(1, s.prompt_tokens),
        "stored_chunks": s.stored_chunks,
        "retrieved_chunks": s.retrieved_chunks,
        "bytes_stored": s.bytes_stored,
        "bytes_retrieved": s.bytes_retrieved,
        "mismatched_bytes": s.mismatched_bytes,
        "evictions": evictions,
        "truncated_requests": s.truncated,
        "lookup_p50_ms": statistics.median(lookups),
        "lookup_p99_ms": lookups[min(len(lookups) - 1, int(len(lookups) * 0.99))],
        "store_gbps": s.bytes_stored / s.store_seconds / 1e9 if s.store_seconds else 0.0,
        "retrieve_gbps": s.bytes_retrieved / s.retrieve_seconds / 1e9 if s.retrieve_seconds else 0.0,
        "wall_seconds": wall,
    }


def _print(result: dict[str, Any], s) -> None:
    table = Table(title="LMCache simulation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    for mismatch in s.mismatches[:10]:
        console.print(f"[red]MISMATCH[/red] {mismatch}")


if __name__ == "__main__":
    app()
