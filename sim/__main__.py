"""`python -m sim`: replay real or synthetic vLLM traffic against a live LMCache server.

    python -m sim replay ../shared/traces/mooncake_conversation.jsonl --requests 2000 --speed 10
    python -m sim synth repeat --requests 20 --prompt-tokens 4096 --model-shape llama-8b --sequential

It starts its own server (or uses one with --host/--port), runs engine processes that drive the
connector's real adapters in vLLM's order, checks every loaded byte, and exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmcache.client import MPClient
from lmcache.config import ConnectorConfig
from lmcache.server.process import ServerProcess
from sim.engine import SimEngine
from sim.model import LAYOUTS, MODEL_SHAPES, ModelSpec
from sim.runner import Pacing, memcpy_gbps, mismatches, play, report
from sim.workloads import KINDS, SimRequest, mooncake, synthetic

app = typer.Typer(help="Replay vLLM traffic against a live LMCache server, byte-verified.",
                  add_completion=False, no_args_is_help=True, rich_markup_mode=None)
console = Console(stderr=True)
ENGINE_MODES = ("tp", "instances")


@dataclass(frozen=True)
class Options:
    requests: int
    l1_size_gb: float
    eviction_policy: str
    chunk_size: int
    host: str | None
    port: int | None
    engines: int
    engine_mode: str
    spec: ModelSpec
    transfer_mode: str
    sequential: bool
    speed: float
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_caching: bool
    max_output_tokens: int
    timeout_s: float
    report: Path | None
    corrupt_after: int


def _bad(message: str, option: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=f"'{option}'")


def _options(**o: Any) -> Options:
    if o["layout"] not in LAYOUTS:
        raise _bad(f"must be one of {', '.join(LAYOUTS)}", "--layout")
    if o["model_shape"] not in MODEL_SHAPES:
        raise _bad(f"must be one of {', '.join(MODEL_SHAPES)}", "--model-shape")
    if o["engine_mode"] not in ENGINE_MODES:
        raise _bad(f"must be one of {', '.join(ENGINE_MODES)}", "--engine-mode")
    for name in ("engines", "requests", "block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
        if o[name] < 1:
            raise _bad("must be at least 1", "--" + name.replace("_", "-"))
    if o["speed"] <= 0:
        raise _bad("must be positive", "--speed")
    if not o["timeout_s"] > 0:
        raise _bad("must be positive", "--timeout-s")
    layers, heads, head_size, dtype = MODEL_SHAPES[o["model_shape"]]
    spec = ModelSpec(
        name=f"sim-{o['model_shape']}", layers=o["layers"] or layers, kv_heads=o["kv_heads"] or heads,
        head_size=o["head_size"] or head_size, dtype=o["dtype"] or dtype, layout=o["layout"],
        block_size=o["block_size"], num_blocks=o["num_blocks"],
    )
    fields = set(Options.__dataclass_fields__) - {"spec", "prefix_caching", "corrupt_after"}
    return Options(spec=spec, prefix_caching=o["enable_prefix_caching"], corrupt_after=o["test_corrupt_l1_after"],
                   **{k: o[k] for k in fields})


Requests = Annotated[int, typer.Option("--requests", help="How many requests to play (a trace's first N).")]
L1 = Annotated[float, typer.Option("--l1-size-gb", help="L1 size of the server the simulator starts.")]
Policy = Annotated[str, typer.Option("--eviction-policy", help="Eviction policy of that server.")]
Chunk = Annotated[int, typer.Option("--chunk-size", help="Chunk size of that server.")]
Host = Annotated[str | None, typer.Option("--host", help="Use a running server at this host instead.")]
Port = Annotated[int | None, typer.Option("--port", help="... and this ZMQ port.")]
Engines = Annotated[int, typer.Option("--engines", help="Engine processes.")]
EngineMode = Annotated[str, typer.Option("--engine-mode", help="tp: tensor-parallel ranks of one model; "
                                         "instances: separate instances of the model, requests in turn.")]
Layout = Annotated[str, typer.Option("--layout", help=f"KV layout: {', '.join(LAYOUTS)}.")]
BlockSize = Annotated[int, typer.Option("--block-size", help="Tokens per KV block.")]
Shape = Annotated[str, typer.Option("--model-shape", help=f"Model preset: {', '.join(MODEL_SHAPES)}.")]
Layers = Annotated[int, typer.Option("--layers", help="Override the preset's layers.")]
KVHeads = Annotated[int, typer.Option("--kv-heads", help="Override the preset's KV heads (per rank).")]
HeadSize = Annotated[int, typer.Option("--head-size", help="Override the preset's head size.")]
DType = Annotated[str, typer.Option("--dtype", help="Override the preset's dtype (float16, bfloat16, float32).")]
Blocks = Annotated[int, typer.Option("--num-blocks", help="KV blocks per engine (longer prompts are cut).")]
Mode = Annotated[str, typer.Option("--transfer-mode", help="auto, engine_driven or lmcache_driven.")]
Sequential = Annotated[bool, typer.Option("--sequential", help="One request at a time, deterministic.")]
Speed = Annotated[float, typer.Option("--speed", help="Arrivals at the timestamps, this many times faster.")]
MaxSeqs = Annotated[int, typer.Option("--max-num-seqs", help="Requests an engine runs at once.")]
MaxTokens = Annotated[int, typer.Option("--max-num-batched-tokens", help="Tokens an engine computes per step.")]
PrefixCaching = Annotated[bool, typer.Option("--enable-prefix-caching", help="Engines keep a local prefix cache.")]
MaxOutput = Annotated[int, typer.Option("--max-output-tokens", help="Decode at most this many tokens per request.")]
Report = Annotated[Path | None, typer.Option("--report", help="Write a JSON report here.")]
Timeout = Annotated[float, typer.Option("--timeout-s", help="The connector's lmcache.mp.timeout_s: bound on every "
                                        "call to the server (a request the server never answers, e.g. because it "
                                        "died, stalls its engine this long).")]
Corrupt = Annotated[int, typer.Option("--test-corrupt-l1-after", hidden=True,
                                      help="Test only: scribble on L1 after N requests.")]


@app.command()
def replay(
    trace: Annotated[Path, typer.Argument(help="A Mooncake JSONL trace.", exists=True, dir_okay=False)],
    requests: Requests = 1000, l1_size_gb: L1 = 1.0, eviction_policy: Policy = "LRU", chunk_size: Chunk = 256,
    host: Host = None, port: Port = None, engines: Engines = 1, engine_mode: EngineMode = "tp",
    layout: Layout = "LBHNC", block_size: BlockSize = 16, model_shape: Shape = "tiny", layers: Layers = 0,
    kv_heads: KVHeads = 0, head_size: HeadSize = 0, dtype: DType = "", num_blocks: Blocks = 8192,
    transfer_mode: Mode = "auto", sequential: Sequential = False, speed: Speed = 1.0, max_num_seqs: MaxSeqs = 64,
    max_num_batched_tokens: MaxTokens = 8192, enable_prefix_caching: PrefixCaching = False,
    max_output_tokens: MaxOutput = 16, timeout_s: Timeout = 60.0, report: Report = None,
    test_corrupt_l1_after: Corrupt = 0,
) -> None:
    """Replay a Mooncake trace (hash ids become deterministic tokens)."""
    opts = _options(**locals())
    sys.exit(_exit_status(_run(mooncake(trace, requests), opts)))


@app.command()
def synth(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(KINDS)}.")],
    requests: Requests = 100, prompt_tokens: Annotated[int, typer.Option("--prompt-tokens")] = 2048,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    rate: Annotated[float, typer.Option("--rate", help="Arrivals per second.")] = 20.0,
    l1_size_gb: L1 = 1.0, eviction_policy: Policy = "LRU", chunk_size: Chunk = 256,
    host: Host = None, port: Port = None, engines: Engines = 1, engine_mode: EngineMode = "tp",
    layout: Layout = "LBHNC", block_size: BlockSize = 16, model_shape: Shape = "tiny", layers: Layers = 0,
    kv_heads: KVHeads = 0, head_size: HeadSize = 0, dtype: DType = "", num_blocks: Blocks = 8192,
    transfer_mode: Mode = "auto", sequential: Sequential = False, speed: Speed = 1.0, max_num_seqs: MaxSeqs = 64,
    max_num_batched_tokens: MaxTokens = 8192, enable_prefix_caching: PrefixCaching = False,
    max_output_tokens: MaxOutput = 16, timeout_s: Timeout = 60.0, report: Report = None,
    test_corrupt_l1_after: Corrupt = 0,
) -> None:
    """Play a synthetic workload: chat, system-prompt, rag, random or repeat."""
    if kind not in KINDS:
        raise _bad(f"must be one of {', '.join(KINDS)}", "KIND")
    if rate <= 0:
        raise _bad("must be positive", "--rate")
    opts = _options(**locals())
    sys.exit(_exit_status(_run(synthetic(kind, requests, prompt_tokens, seed, rate), opts)))


@app.command()
def sweep(
    trace: Annotated[Path, typer.Argument(help="A Mooncake JSONL trace.", exists=True, dir_okay=False)],
    l1_size_gb: Annotated[str, typer.Option("--l1-size-gb", help="Comma-separated L1 sizes in GB.")] = "0.01,0.03,0.1,0.3,1",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of hit rate against L1 size.")] = None,
    requests: Requests = 1000, eviction_policy: Policy = "LRU", chunk_size: Chunk = 256, layout: Layout = "LBHNC",
    block_size: BlockSize = 16, model_shape: Shape = "tiny", num_blocks: Blocks = 8192,
    transfer_mode: Mode = "auto", max_output_tokens: MaxOutput = 0, report: Report = None,
) -> None:
    """Replay a trace once per L1 size, one request at a time: the hit rate each size of server gives."""
    try:
        sizes = [float(x) for x in l1_size_gb.split(",") if x.strip()]
    except ValueError:
        raise _bad("must be comma-separated numbers, e.g. 1,2,4", "--l1-size-gb") from None
    rows = []
    for size in sizes:
        opts = _options(
            requests=requests, l1_size_gb=size, eviction_policy=eviction_policy, chunk_size=chunk_size, host=None,
            port=None, engines=1, engine_mode="tp", layout=layout, block_size=block_size, model_shape=model_shape,
            layers=0, kv_heads=0, head_size=0, dtype="", num_blocks=num_blocks, transfer_mode=transfer_mode,
            sequential=True, speed=1.0, max_num_seqs=1, max_num_batched_tokens=1 << 20,
            enable_prefix_caching=False, max_output_tokens=max_output_tokens, timeout_s=60.0, report=None,
            test_corrupt_l1_after=0,
        )
        result = _run(mooncake(trace, requests), opts)
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
        table.add_row(f"{row['l1_size_gb']:g}", f"{row['hit_rate']:.1%}", str(row["evictions"]),
                      str(row["mismatched_bytes"]))
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


def _run(source: Iterable[SimRequest], o: Options) -> dict[str, Any]:
    with ExitStack() as stack:
        server = None
        if o.port is None:
            server = stack.enter_context(ServerProcess(
                l1_size_gb=o.l1_size_gb,
                extra_args=["--chunk-size", str(o.chunk_size), "--eviction-policy", o.eviction_policy],
            ))
            host, port = "127.0.0.1", server.port
        else:
            host, port = o.host or "localhost", o.port
        config = ConnectorConfig(host=f"tcp://{host}", port=port, mp_transfer_mode=o.transfer_mode,
                                 lookup_wait_ms=50, timeout_s=o.timeout_s)
        with MPClient(host, port, timeout_s=10) as client:
            chunk = client.hello().chunk_size
            if server is not None:
                _wait_for_prefault(client)
            before = client.status()["l1"]
        if chunk % o.spec.block_size:
            raise _bad(f"the server's chunk size {chunk} is not a multiple of it", "--block-size")
        tp = o.engines if o.engine_mode == "tp" else 1
        engines = [
            SimEngine(o.spec, config, tp, chunk, f"sim-{i}", o.max_num_seqs, o.max_num_batched_tokens,
                      o.prefix_caching, o.max_output_tokens)
            for i in range(1 if o.engine_mode == "tp" else o.engines)
        ]
        pacing = Pacing(o.sequential, o.speed, o.corrupt_after, server.proc.pid if server else None)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task("replaying", total=o.requests)
            wall = play(source, engines, pacing, lambda n: bar.update(task, advance=n))
        transfers = [e.close() for e in engines]
        with MPClient(host, port, timeout_s=10) as client:
            after = client.status()["l1"]
    result = report(engines, transfers, wall, after["evictions"] - before["evictions"])
    result["memcpy_gbps"] = memcpy_gbps(engines[0].spec.block_bytes() * (chunk // o.spec.block_size) * 16)
    _print(result)
    for mismatch in mismatches(engines)[:10]:
        console.print(f"[red]MISMATCH[/red] {mismatch}")
    if o.report is not None:
        o.report.write_text(json.dumps(result, indent=2))
    return result


def _wait_for_prefault(client: MPClient, timeout_s: float = 300.0) -> None:
    """Plays against a server whose L1 is faulted in, as one that has been up a while: the
    figures are then the steady state, not the first touch of fresh memory."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        l1 = client.status()["l1"]
        if l1["prefaulted_bytes"] >= l1["capacity_bytes"]:
            return
        time.sleep(0.05)  # polling the server's progress, with a deadline


def _print(result: dict[str, Any]) -> None:
    table = Table(title="LMCache simulation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


if __name__ == "__main__":
    app()
