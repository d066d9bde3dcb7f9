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
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, NoReturn, get_type_hints

import typer
from rich.console import Console
from rich.table import Table

from lmcache.client import MPClient
from lmcache.config import ConnectorConfig, EvictionPolicy
from lmcache.kv_transfer import TransferStats
from lmcache.server.process import ServerProcess
from sim._deps import INSTALL, missing  # first of sim's modules: without torch, one line, not a traceback
from sim.budget import BudgetError, budget_bytes, human_bytes, num_blocks
from sim.engine import SimEngine
from sim.leftovers import remove_files_of
from sim.model import LAYOUTS, MODEL_SHAPES, ModelSpec
from sim.runner import Pacing, ProgressLines, memcpy_gbps, mismatches, play, report
from sim.summary import Setup, lines
from sim.worker import sigint_ignored
from sim.workloads import KINDS, SimRequest, TraceError, count_requests, mooncake, synthetic

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
    eviction_policy: str = _option("--eviction-policy", EvictionPolicy.LONG_2Q.value,
                                   "Eviction policy of that server (sweep: a comma-separated list).")
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
    num_blocks: int | None = _option("--num-blocks", None, "KV blocks per engine rank (default: as many as "
                                     "--memory-gb holds, at most 8192; longer prompts are cut).")
    memory_gb: float | None = _option("--memory-gb", None, "KV memory budget in GiB for all simulated engines "
                                      "together (default: half of the memory available now, from MemAvailable and "
                                      "the cgroup limit). Sizes --num-blocks when that is not given; a run that does "
                                      "not fit is refused before anything starts.")
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
    report: Path | None = _option("--report", None, "Write the report here as JSON (every figure, unrounded; "
                                  "a human summary goes to stderr either way).")
    progress_every_s: float = _option("--progress-every-s", 5.0, "Seconds between progress lines on stderr "
                                      "(requests done, hit rate so far); 0: none.")
    test_corrupt_l1_after: int = _option("--test-corrupt-l1-after", 0, "Test only: scribble on L1 after N requests.",
                                         hidden=True)

    def check(self) -> None:
        """Refuses what typer's types let through, as a usage error naming the option."""
        for value, allowed, flag in ((self.layout, LAYOUTS, "--layout"), (self.model_shape, MODEL_SHAPES, "--model-shape"),
                                     (self.engine_mode, ENGINE_MODES, "--engine-mode")):
            if value not in allowed:
                raise _bad(f"must be one of {', '.join(allowed)}", flag)
        for name in ("engines", "requests", "block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise _bad("must be at least 1", "--" + name.replace("_", "-"))
        if self.speed <= 0:
            raise _bad("must be positive", "--speed")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise _bad("must be positive", "--memory-gb")
        if self.progress_every_s < 0:
            raise _bad("must be 0 (no progress lines) or more", "--progress-every-s")
        if not self.timeout_s > 0:
            raise _bad("must be positive", "--timeout-s")

    @property
    def spec(self) -> ModelSpec:
        """The engines' model; its num_blocks is 0 until _sized() has sized it (block_bytes() needs none)."""
        layers, heads, head_size, dtype = MODEL_SHAPES[self.model_shape]
        return ModelSpec(
            name=f"sim-{self.model_shape}", layers=self.layers or layers, kv_heads=self.kv_heads or heads,
            head_size=self.head_size or head_size, dtype=self.dtype or dtype, layout=self.layout,
            block_size=self.block_size, num_blocks=self.num_blocks or 0,
        )

    @property
    def object_bytes(self) -> int:
        """One chunk of one rank, at --chunk-size."""
        return self.spec.block_bytes() * self.chunk_size // self.block_size


def _bad(message: str, option: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=f"'{option}'")


def _say(line: str) -> None:
    """One line to stderr as it is: no markup ('.[sim]' is not a style), no wrapping at 80 columns."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    """A usage error that is no option's (a bad trace line): one line, exit status 2."""
    _say(f"error: {message}")
    sys.exit(2)


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


Trace = Annotated[Path, typer.Argument(
    help="A Mooncake JSONL trace: a JSON object a line with timestamp (ms), input_length, hash_ids and optionally "
         "output_length. Blank lines are skipped; a bad line stops the run before it starts, naming the line and "
         "the key. A trace shorter than --requests is played whole, with a warning.",
    exists=True, dir_okay=False)]


def _trace_requests(trace: Path, requests: int, skip: int = 0) -> int:
    """How many requests the trace gives the run (checking every line it plays); a bad line, or
    none left to play, ends the command here in one line."""
    try:
        n = count_requests(trace, requests, skip)
    except TraceError as e:
        _fail(str(e))
    after = f" after the first {skip}" if skip else ""
    if n == 0:
        _fail(f"{trace} has no requests{after}")
    if n < requests:
        _say(f"warning: {trace} has only {n} requests{after}, fewer than --requests {requests}: playing those {n}")
    return n


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
    total = _trace_requests(trace, opts.requests, skip)
    sys.exit(_exit_status(_run(mooncake(trace, opts.requests, skip), opts, total)))


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
                      "memory_gb", "transfer_mode", "max_output_tokens", "report", "progress_every_s"), max_output_tokens=0)
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
    if plot is not None and missing("matplotlib"):
        raise _bad(f"needs matplotlib: {INSTALL}", "--plot")
    total = _trace_requests(trace, opts.requests)
    rows: list[dict[str, Any]] = []
    mismatched = False
    for policy in policies:
        for size in sizes:
            # --report here is the sweep's, of all rows, not each run's
            one = replace(opts, l1_size_gb=size, eviction_policy=policy.value, sequential=True, max_num_seqs=1,
                          max_num_batched_tokens=1 << 20, report=None)
            result = _run(mooncake(trace, opts.requests), one, total)
            rows.append({"policy": policy.value, "l1_size_gb": size, **result})
            mismatched |= bool(result["mismatched_bytes"])
            if result["interrupted"]:  # what was swept so far, and nothing offline: Ctrl-C means stop
                if opts.report is not None:
                    opts.report.write_text(json.dumps(rows, indent=2))
                sys.exit(INTERRUPTED)
    object_bytes = opts.object_bytes
    requests = trace_requests(trace, opts.chunk_size, opts.requests)
    for size in sizes:
        for b in bounds(requests, capacity_chunks(size, object_bytes), opts.chunk_size, []):
            rows.append({"policy": b.policy, "l1_size_gb": size, "hit_rate": b.hit_rate, "hit_tokens": b.hit_tokens,
                         "evictions": b.evictions, "mismatched_bytes": 0, "offline": True})
    if opts.report is not None:
        opts.report.write_text(json.dumps(rows, indent=2))
    shape = f"{opts.model_shape} model, {opts.chunk_size}-token chunks of {human_bytes(object_bytes)}"
    if plot is not None:
        _plot(rows, plot, f"{trace.name}, {total} requests, {shape}")
    names = list(dict.fromkeys(r["policy"] for r in rows))
    table = Table(title=f"hit rate by L1 size: {trace.name}, {total} requests ({shape}; Belady and unlimited offline)")
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


ALL_POLICIES = ",".join(p.value for p in EvictionPolicy)


@app.command()
@shared_options(only=("requests", "chunk_size", "model_shape", "report"))
def bound(
    trace: Trace,
    l1_size_gb: Annotated[str, typer.Option("--l1-size-gb", help="Comma-separated L1 sizes in GB.")] = "0.01,0.03,0.1",
    eviction_policy: Annotated[str, typer.Option("--eviction-policy", help="Comma-separated policies.")] = ALL_POLICIES,
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
    object_bytes = opts.object_bytes
    _trace_requests(trace, opts.requests, skip)
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
    fig.savefig(path, metadata={"Title": f"LMCache hit rate: {title}"})  # for tools (and tests) that read PNG text
    plt.close(fig)


INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)
STOP_S = 10.0  # after a Ctrl-C: how long the engines get to finish their I/O and say what they moved


def _exit_status(*results: dict[str, Any]) -> int:
    if any(r["interrupted"] for r in results):
        return INTERRUPTED
    return 1 if any(r["mismatched_bytes"] for r in results) else 0


@dataclass
class _Played:
    """How far a run got: enough for its report, whole or (after a Ctrl-C) partial."""

    ranks: int  # per engine
    engines: list[SimEngine] = field(default_factory=list)
    endpoint: tuple[str, int] | None = None
    chunk: int = 0
    before: dict[str, Any] | None = None  # the server's /status before and after
    after: dict[str, Any] | None = None
    progress: ProgressLines | None = None
    wall: float = 0.0
    transfers: list[list[TransferStats | None]] = field(default_factory=list)  # None: a rank killed before it said
    interrupted: bool = False


def _run(source: Iterable[SimRequest], o: Options, total: int | None = None) -> dict[str, Any]:
    """Plays ``source`` (``total`` requests; --requests by default) and reports. Everything it
    starts it stops, however it ends; after a Ctrl-C that includes the shared memory the engines
    and the server leave, and the report covers what was played ("interrupted": true)."""
    o.check()  # here, not when the options are parsed, so that a command's own checks come first
    budget, o = _sized(o)  # and this before anything starts: a run that does not fit is refused
    run = _Played(ranks=o.engines if o.engine_mode == "tp" else 1)
    server = None if o.port is not None else ServerProcess(
        l1_size_gb=o.l1_size_gb,
        extra_args=["--chunk-size", str(o.chunk_size), "--eviction-policy", o.eviction_policy,
                    *[arg for adapter in o.l2_adapter or () for arg in ("--l2-adapter", adapter)]],
    )
    with ExitStack() as stack:
        if server is not None:
            stack.callback(_stop_server, server)
        stack.callback(_kill, run.engines)  # first out: the engines, before their server
        try:
            _play(source, o, server, run, total or o.requests)
        except KeyboardInterrupt:
            stack.enter_context(sigint_ignored())  # a second Ctrl-C must not cut the clean-up short
            _wind_down(run, server)
    result = _result(run, o)
    _print(result, Setup(o.model_shape, o.spec, run.chunk or o.chunk_size, len(run.engines) or 1, run.ranks,
                         o.requests, total or o.requests, budget), o.report)
    for mismatch in mismatches(run.engines)[:10]:
        console.print(f"[red]MISMATCH[/red] {mismatch}")
    if o.report is not None:
        o.report.write_text(json.dumps(result, indent=2))
    return result


def _kill(engines: list[SimEngine]) -> None:
    """Whatever ranks still run (none after a clean close), and what they left in /dev/shm."""
    for e in engines:
        e.kill()


def _sized(o: Options) -> tuple[int, Options]:
    """The KV budget in bytes, and the options with --num-blocks sized from it (or checked against it)."""
    least = o.chunk_size // o.block_size + 2  # what a one-chunk prompt needs (see SimEngine.add)
    try:
        budget = budget_bytes(o.memory_gb)
        blocks = num_blocks(budget, o.spec.block_bytes(), o.engines, o.num_blocks, least, o.model_shape)
    except BudgetError as e:
        raise _bad(str(e), e.option) from None
    return budget, replace(o, num_blocks=blocks)


def _play(source: Iterable[SimRequest], o: Options, server: ServerProcess | None, run: _Played, total: int) -> None:
    if server is not None:
        server.start()
        run.endpoint = ("127.0.0.1", server.port)
    else:
        run.endpoint = (o.host or "localhost", o.port or 0)
    host, port = run.endpoint
    config = ConnectorConfig(host=f"tcp://{host}", port=port, mp_transfer_mode=o.transfer_mode,
                             lookup_wait_ms=50, timeout_s=o.timeout_s)
    with MPClient(host, port, timeout_s=10) as client:
        run.chunk = client.hello().chunk_size
        if server is not None:
            _wait_for_prefault(client)
        run.before = client.status()
    if run.chunk % o.spec.block_size:
        raise _bad(f"the server's chunk size {run.chunk} is not a multiple of it", "--block-size")
    for i in range(1 if o.engine_mode == "tp" else o.engines):
        run.engines.append(SimEngine(o.spec, config, run.ranks, run.chunk, f"sim-{i}", o.max_num_seqs,
                                     o.max_num_batched_tokens, o.enable_prefix_caching, o.max_output_tokens))
    pacing = Pacing(o.sequential, o.speed, o.test_corrupt_l1_after, server.proc.pid if server and server.proc else None)
    run.progress = ProgressLines(run.engines, total, o.progress_every_s, _say)
    run.wall = play(source, run.engines, pacing, run.progress)
    run.transfers = [list(e.close()) for e in run.engines]
    with MPClient(host, port, timeout_s=10) as client:
        run.after = client.status()


def _wind_down(run: _Played, server: ServerProcess | None) -> None:
    """After a Ctrl-C: the engines finish their I/O (or are killed), and the server, if it still
    runs, says what it evicted. A Ctrl-C in a terminal reaches the server as well, which then stops
    itself: the engines' I/O could only time out, so they are killed at once."""
    _say("interrupted: stopping the engines and the server, then reporting what was played")
    run.interrupted = True
    if run.progress is not None:
        run.wall = time.monotonic() - run.progress.started

    def server_gone() -> bool:
        return server is not None and server.proc is not None and server.proc.poll() is not None

    deadline = time.monotonic() + STOP_S
    run.transfers = [e.stop(deadline, server_gone) for e in run.engines]
    if run.endpoint is not None and run.before is not None and not server_gone():
        run.after = _status_if_up(run.endpoint)


def _status_if_up(endpoint: tuple[str, int]) -> dict[str, Any] | None:
    """The server's status, or None if it does not answer (it is stopping on the same Ctrl-C)."""
    try:
        with MPClient(*endpoint, timeout_s=2.0) as client:
            return client.status()
    except (OSError, RuntimeError):  # ServerUnavailableError is a ConnectionError, ServerError a RuntimeError
        return None


def _stop_server(server: ServerProcess) -> None:
    """Stops the server we started (unless a terminal's Ctrl-C already did) and removes what it
    left in /dev/shm: a server killed for overstaying its stop leaves its L1 arena."""
    if server.proc is None:
        return
    try:
        server.stop()
    except subprocess.TimeoutExpired:
        pass  # stop() killed it
    remove_files_of(server.proc.pid)


def _result(run: _Played, o: Options) -> dict[str, Any]:
    """The report: the runner's figures, the server's evictions and hits by tier when it could say,
    the model and chunk they were measured with, and whether the run was cut short."""
    if not run.engines:  # interrupted before any engine started: nothing was played
        return {"requests": 0, "finished_requests": 0, "mismatched_bytes": 0, "interrupted": True}
    transfers = [[t or TransferStats() for t in ts] for ts in run.transfers] or [[TransferStats()] * run.ranks
                                                                                  for _ in run.engines]
    before, after = run.before, run.after
    evictions = after["l1"]["evictions"] - before["l1"]["evictions"] if before and after else 0
    result = report(run.engines, transfers, run.wall, evictions)
    result["hit_tokens_by_tier"] = (_hits_by_tier(result["hit_tokens"], before["l2"], after["l2"], run.chunk, run.ranks)
                                    if before and after else {})
    chunk_bytes = o.spec.block_bytes() * (run.chunk // o.spec.block_size)
    result["memcpy_gbps"] = memcpy_gbps(chunk_bytes * 16)
    result |= {
        "finished_requests": run.progress.done if run.progress else 0,
        "model_shape": o.model_shape,
        "chunk_tokens": run.chunk,
        "chunk_bytes": chunk_bytes,  # one rank's
        "num_blocks": o.num_blocks,
        "interrupted": run.interrupted,
        "unreported_ranks": sum(t is None for ts in run.transfers for t in ts),
    }
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


def _print(result: dict[str, Any], setup: Setup, report_path: Path | None) -> None:
    if "steps" not in result:
        _say("interrupted before the first request: nothing to report")
        return
    for line in lines(result, setup, str(report_path) if report_path else None):
        _say(line)


if __name__ == "__main__":
    app()
