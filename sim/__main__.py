"""`python -m sim`: replay real or synthetic vLLM traffic against a live LMCache server.

    python -m sim replay sim/traces/mooncake_conversation.jsonl --requests 2000 --speed 10
    python -m sim synth repeat --requests 20 --prompt-tokens 4096 --model-shape llama-8b --sequential

It starts its own server (or uses one with --host/--port), runs engine processes that drive the
connector's real adapters in vLLM's order, checks every loaded byte, and exits 1 on any mismatch.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmcache.client import MPClient
from lmcache.config import ConnectorConfig, EvictionPolicy
from lmcache.server.process import ServerProcess
from sim.engine import SimEngine
from sim.model import LAYOUTS, MODEL_SHAPES, ModelSpec
from sim.runner import Pacing, memcpy_gbps, mismatches, play, report
from sim.workloads import KINDS, SimRequest, mooncake, synthetic

app = typer.Typer(help="Replay vLLM traffic against a live LMCache server, byte-verified.",
                  add_completion=False, no_args_is_help=True, rich_markup_mode=None)
console = Console(stderr=True)
ENGINE_MODES = ("tp", "instances")


def _option(flag: str, default: Any, help: str, **extra: Any) -> Any:
    """A field of Options that is also its CLI option, so flag, default and help are written once."""
    return field(default=default, metadata={"option": typer.Option(flag, help=help, **extra)})


@dataclass(frozen=True)
class Options:
    """The options the commands share, in the order --help lists them (see shared_options)."""

    requests: int = _option("--requests", 1000, "How many requests to play (a trace's first N).")
    l1_size_gb: float = _option("--l1-size-gb", 1.0, "L1 size of the server the simulator starts.")
    eviction_policy: str = _option("--eviction-policy", "LRU", "Eviction policy of that server (sweep: a comma-separated list).")
    chunk_size: int = _option("--chunk-size", 256, "Chunk size of that server.")
    l2_adapter: list[str] | None = _option("--l2-adapter", None, "An L2 tier for the server the simulator starts "
                                           "(its --l2-adapter JSON; repeat for several).")
    host: str | None = _option("--host", None, "Use a running server at this host instead.")
    port: int | None = _option("--port", None, "... and this ZMQ port.")
    engines: int = _option("--engines", 1, "Engine processes.")
    engine_mode: str = _option("--engine-mode", "tp", "tp: tensor-parallel ranks of one model; "
                               "instances: separate instances of the model, requests in turn.")
    layout: str = _option("--layout", "LBHNC", f"KV layout: {', '.join(LAYOUTS)}.")
    block_size: int = _option("--block-size", 16, "Tokens per KV block.")
    model_shape: str = _option("--model-shape", "tiny", f"Model preset: {', '.join(MODEL_SHAPES)}.")
    layers: int = _option("--layers", 0, "Override the preset's layers.")
    kv_heads: int = _option("--kv-heads", 0, "Override the preset's KV heads (per rank).")
    head_size: int = _option("--head-size", 0, "Override the preset's head size.")
    dtype: str = _option("--dtype", "", "Override the preset's dtype (float16, bfloat16, float32).")
    num_blocks: int = _option("--num-blocks", 8192, "KV blocks per engine (longer prompts are cut).")
    transfer_mode: str = _option("--transfer-mode", "auto", "auto, engine_driven or lmcache_driven.")
    sequential: bool = _option("--sequential", False, "One request at a time, deterministic.")
    speed: float = _option("--speed", 1.0, "Arrivals at the timestamps, this many times faster.")
    max_num_seqs: int = _option("--max-num-seqs", 64, "Requests an engine runs at once.")
    max_num_batched_tokens: int = _option("--max-num-batched-tokens", 8192, "Tokens an engine computes per step.")
    enable_prefix_caching: bool = _option("--enable-prefix-caching", False, "Engines keep a local prefix cache.")
    max_output_tokens: int = _option("--max-output-tokens", 16, "Decode at most this many tokens per request.")
    timeout_s: float = _option("--timeout-s", 60.0, "The connector's lmcache.mp.timeout_s: bound on every call "
                               "to the server (a request the server never answers, e.g. because it died, stalls "
                               "its engine this long).")
    report: Path | None = _option("--report", None, "Write a JSON report here.")
    test_corrupt_l1_after: int = _option("--test-corrupt-l1-after", 0, "Test only: scribble on L1 after N requests.",
                                         hidden=True)

    def check(self) -> None:
        """Refuses what typer's types let through, as a usage error naming the option."""
        for value, allowed, flag in ((self.layout, LAYOUTS, "--layout"), (self.model_shape, MODEL_SHAPES, "--model-shape"),
                                     (self.engine_mode, ENGINE_MODES, "--engine-mode")):
            if value not in allowed:
                raise _bad(f"must be one of {', '.join(allowed)}", flag)
        for name in ("engines", "requests", "block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise _bad("must be at least 1", "--" + name.replace("_", "-"))
        if self.speed <= 0:
            raise _bad("must be positive", "--speed")
        if not self.timeout_s > 0:
            raise _bad("must be positive", "--timeout-s")

    @property
    def spec(self) -> ModelSpec:
        layers, heads, head_size, dtype = MODEL_SHAPES[self.model_shape]
        return ModelSpec(
            name=f"sim-{self.model_shape}", layers=self.layers or layers, kv_heads=self.kv_heads or heads,
            head_size=self.head_size or head_size, dtype=self.dtype or dtype, layout=self.layout,
            block_size=self.block_size, num_blocks=self.num_blocks,
        )


def _bad(message: str, option: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=f"'{option}'")


Command = Callable[..., None]


def shared_options(*, only: tuple[str, ...] | None = None, **defaults: Any) -> Callable[[Command], Command]:
    """Gives a command the shared options of Options (all, or `only` these), and them packed into its `opts`.

    typer reads a command's options off its signature, so this rewrites the signature: the `opts: Options`
    parameter becomes the options, in Options' order, with `defaults` in place of theirs. A shared option
    the command names among its own parameters is listed there instead, and passed to it as well. Options
    not offered keep their defaults.
    """
    names = [f.name for f in fields(Options) if only is None or f.name in only]
    hints = get_type_hints(Options)
    kw = inspect.Parameter.KEYWORD_ONLY  # typer passes everything by name; this lets any order be valid

    def option(f: Any) -> inspect.Parameter:
        return inspect.Parameter(f.name, kw, default=defaults.get(f.name, f.default),
                                 annotation=Annotated[hints[f.name], f.metadata["option"]])

    def decorate(command: Command) -> Command:
        # eval_str: typer takes a set __signature__ as it is, and would not see through string annotations
        own = inspect.signature(command, eval_str=True).parameters
        shared = {f.name: option(f) for f in fields(Options) if f.name in names}
        params: list[inspect.Parameter] = []
        for p in own.values():
            if p.name == "opts":
                params += [o for name, o in shared.items() if name not in own]
            else:
                params.append(shared.get(p.name, p.replace(kind=kw)))

        @functools.wraps(command)
        def run(**values: Any) -> None:
            command(**{k: v for k, v in values.items() if k in own}, opts=Options(**{n: values[n] for n in names}))

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return run

    return decorate


Trace = Annotated[Path, typer.Argument(help="A Mooncake JSONL trace.", exists=True, dir_okay=False)]


@app.command()
@shared_options()
def replay(
    trace: Trace,
    skip: Annotated[int, typer.Option("--skip", help="Start after a trace's first N requests (e.g. the part another "
                                                     "server played).")] = 0,
    *, opts: Options,
) -> None:
    """Replay a Mooncake trace (hash ids become deterministic tokens)."""
    if skip < 0:
        raise _bad("must be 0 or more", "--skip")
    sys.exit(_exit_status(_run(mooncake(trace, opts.requests, skip), opts)))


@app.command()
@shared_options(requests=100)
def synth(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(KINDS)}.")],
    requests: int,  # the shared --requests, named here so that --help lists it before synth's own options
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens")] = 2048,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    rate: Annotated[float, typer.Option("--rate", help="Arrivals per second.")] = 20.0,
    *, opts: Options,
) -> None:
    """Play a synthetic workload: chat, system-prompt, rag, random or repeat."""
    if kind not in KINDS:
        raise _bad(f"must be one of {', '.join(KINDS)}", "KIND")
    if rate <= 0:
        raise _bad("must be positive", "--rate")
    sys.exit(_exit_status(_run(synthetic(kind, requests, prompt_tokens, seed, rate), opts)))


@app.command()
@shared_options(only=("requests", "eviction_policy", "chunk_size", "l2_adapter", "layout", "block_size", "model_shape", "num_blocks",
                      "transfer_mode", "max_output_tokens", "report"), max_output_tokens=0)
def sweep(
    trace: Trace,
    l1_size_gb: Annotated[str, typer.Option("--l1-size-gb", help="Comma-separated L1 sizes in GB.")] = "0.01,0.03,0.1,0.3,1",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of hit rate against L1 size.")] = None,
    *, opts: Options,
) -> None:
    """Replay a trace once per L1 size and eviction policy (--eviction-policy takes a comma-separated
    list), one request at a time; beside them, Belady's MIN and unlimited memory, computed offline."""
    from sim.bound import bounds, capacity_chunks, trace_requests

    sizes = _sizes(l1_size_gb)
    policies = _policies(opts.eviction_policy)
    rows: list[dict[str, Any]] = []
    mismatched = False
    for policy in policies:
        for size in sizes:
            # --report here is the sweep's, of all rows, not each run's
            one = replace(opts, l1_size_gb=size, eviction_policy=policy.value, sequential=True, max_num_seqs=1,
                          max_num_batched_tokens=1 << 20, report=None)
            result = _run(mooncake(trace, opts.requests), one)
            rows.append({"policy": policy.value, "l1_size_gb": size, **result})
            mismatched |= bool(result["mismatched_bytes"])
    object_bytes = opts.spec.block_bytes() * opts.chunk_size // opts.block_size
    requests = trace_requests(trace, opts.chunk_size, opts.requests)
    for size in sizes:
        for b in bounds(requests, capacity_chunks(size, object_bytes), opts.chunk_size, []):
            rows.append({"policy": b.policy, "l1_size_gb": size, "hit_rate": b.hit_rate, "hit_tokens": b.hit_tokens,
                         "evictions": b.evictions, "mismatched_bytes": 0, "offline": True})
    if opts.report is not None:
        opts.report.write_text(json.dumps(rows, indent=2))
    if plot is not None:
        _plot(rows, plot, f"{trace.name}, {opts.requests} requests, {opts.model_shape} model")
    names = list(dict.fromkeys(r["policy"] for r in rows))
    table = Table(title=f"hit rate by L1 size: {trace.name}, {opts.requests} requests ({opts.model_shape} model; "
                        "Belady and unlimited offline)")
    for column in ("L1 GB", *names):
        table.add_column(column, justify="right")
    for size in sizes:
        by = {r["policy"]: r for r in rows if r["l1_size_gb"] == size}
        table.add_row(f"{size:g}", *[f"{by[n]['hit_rate']:.1%}" + (" (!)" if by[n]["mismatched_bytes"] else "")
                                     for n in names])
    console.print(table)
    sys.exit(1 if mismatched else 0)


def _sizes(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _bad("must be comma-separated numbers, e.g. 0.01,0.1,1", "--l1-size-gb") from None


def _policies(text: str) -> list[EvictionPolicy]:
    try:
        return [EvictionPolicy(_policy_name(p)) for p in text.split(",") if p.strip()]
    except ValueError:
        raise _bad(f"must be comma-separated names of {', '.join(p.value for p in EvictionPolicy)}",
                   "--eviction-policy") from None


@app.command()
@shared_options(only=("requests", "chunk_size", "model_shape", "report"))
def bound(
    trace: Trace,
    l1_size_gb: Annotated[str, typer.Option("--l1-size-gb", help="Comma-separated L1 sizes in GB.")] = "0.01,0.03,0.1",
    eviction_policy: Annotated[str, typer.Option("--eviction-policy", help="Comma-separated policies.")] = "LRU,S3FIFO,ARC",
    skip: Annotated[int, typer.Option("--skip", help="Start after a trace's first N requests.")] = 0,
    *, opts: Options,
) -> None:
    """Hit rates of each eviction policy, of Belady's MIN and of unlimited memory on the chunks a
    sequential replay would store and look up, computed offline (no server, seconds)."""
    from sim.bound import bounds, capacity_chunks, trace_requests

    sizes = _sizes(l1_size_gb)
    policies = _policies(eviction_policy)
    if opts.model_shape not in MODEL_SHAPES:
        raise _bad(f"must be one of {', '.join(MODEL_SHAPES)}", "--model-shape")
    object_bytes = opts.spec.block_bytes() * opts.chunk_size // opts.block_size
    requests = trace_requests(trace, opts.chunk_size, opts.requests, skip)
    rows = []
    table = Table(title=f"hit rate by policy (offline): {trace.name}, {len(requests)} requests from {skip + 1}, "
                        f"{opts.model_shape} ({object_bytes} B chunks)")
    for column in ("L1 GB", "chunks", *[p.value for p in policies], "Belady", "unlimited"):
        table.add_column(column, justify="right")
    for size in sizes:
        results = list(bounds(requests, capacity_chunks(size, object_bytes), opts.chunk_size, policies))
        rows.append({"l1_size_gb": size, "capacity_chunks": results[0].capacity_chunks,
                     **{r.policy: {"hit_rate": r.hit_rate, "hit_tokens": r.hit_tokens, "evictions": r.evictions}
                        for r in results}})
        table.add_row(f"{size:g}", str(results[0].capacity_chunks), *[f"{r.hit_rate:.1%}" for r in results])
    if opts.report is not None:
        opts.report.write_text(json.dumps(rows, indent=2))
    console.print(table)


def _policy_name(text: str) -> str:
    for p in EvictionPolicy:
        if p.value.lower() == text.strip().lower():
            return p.value
    return text


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles: dict[str, dict[str, Any]] = {"Belady": {"linestyle": "--", "color": "black"},
                                         "unlimited": {"linestyle": ":", "color": "gray"}}
    for name in dict.fromkeys(r["policy"] for r in rows):
        line = [r for r in rows if r["policy"] == name]
        ax.plot([r["l1_size_gb"] for r in line], [100 * r["hit_rate"] for r in line], marker="o", label=name,
                **styles.get(name, {}))
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("L1 size (GB)")
    ax.set_ylabel("hit rate (% of prompt tokens)")
    ax.set_title(f"LMCache hit rate: {title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _exit_status(*results: dict[str, Any]) -> int:
    return 1 if any(r["mismatched_bytes"] for r in results) else 0


def _run(source: Iterable[SimRequest], o: Options) -> dict[str, Any]:
    o.check()  # here, not when the options are parsed, so that a command's own checks come first
    with ExitStack() as stack:
        server = None
        if o.port is None:
            server = stack.enter_context(ServerProcess(
                l1_size_gb=o.l1_size_gb,
                extra_args=["--chunk-size", str(o.chunk_size), "--eviction-policy", o.eviction_policy,
                            *[arg for adapter in o.l2_adapter or () for arg in ("--l2-adapter", adapter)]],
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
            before = client.status()
        if chunk % o.spec.block_size:
            raise _bad(f"the server's chunk size {chunk} is not a multiple of it", "--block-size")
        tp = o.engines if o.engine_mode == "tp" else 1
        engines = [
            SimEngine(o.spec, config, tp, chunk, f"sim-{i}", o.max_num_seqs, o.max_num_batched_tokens,
                      o.enable_prefix_caching, o.max_output_tokens)
            for i in range(1 if o.engine_mode == "tp" else o.engines)
        ]
        pacing = Pacing(o.sequential, o.speed, o.test_corrupt_l1_after, server.proc.pid if server and server.proc else None)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task("replaying", total=o.requests)
            wall = play(source, engines, pacing, lambda n: bar.update(task, advance=n))
        transfers = [e.close() for e in engines]
        with MPClient(host, port, timeout_s=10) as client:
            after = client.status()
    result = report(engines, transfers, wall, after["l1"]["evictions"] - before["l1"]["evictions"])
    result["hit_tokens_by_tier"] = _hits_by_tier(result["hit_tokens"], before["l2"], after["l2"], chunk, tp)
    result["memcpy_gbps"] = memcpy_gbps(engines[0].spec.block_bytes() * (chunk // o.spec.block_size) * 16)
    _print(result)
    for mismatch in mismatches(engines)[:10]:
        console.print(f"[red]MISMATCH[/red] {mismatch}")
    if o.report is not None:
        o.report.write_text(json.dumps(result, indent=2))
    return result


def _hits_by_tier(hit_tokens: int, before: dict[str, Any], after: dict[str, Any], chunk: int, ranks: int) -> dict[str, int]:
    """The run's hit tokens by where the server found them: loaded from an L2 tier during a
    lookup (counted once per request, not per rank), or already in L1."""
    tiers = {
        f"l2[{i}]:{tier['type']}": (tier["hit_chunks"] - was["hit_chunks"]) * chunk // ranks
        for i, (tier, was) in enumerate(zip(after.get("tiers", []), before.get("tiers", []), strict=True))
    }
    return {"l1": max(0, hit_tokens - sum(tiers.values())), **tiers}


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
