"""The `lmcache` command: `lmcache server` runs the cache server, `lmcache ping` checks one,
`lmcache keygen` writes a CurveZMQ key pair for them."""

from __future__ import annotations

import enum
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from lmcache import __version__
from lmcache.config import ConfigError, ConnectorConfig, EvictionPolicy, LogLevel, ServerConfig, zmq_endpoint

try:  # typer >= 0.16 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

app = typer.Typer(
    name="lmcache",
    help="LMCache: a KV-cache server for LLM inference. vLLM's LMCacheMPConnector stores the KV "
    "cache of prompt prefixes in the server's CPU memory and loads it back when a prefix repeats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich tables truncate long flag names at 80 columns
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Config fields whose flag is not simply the field name with dashes.
_FLAGS = {"lock_ttl_s": "--lock-ttl", "engine_ttl_s": "--engine-ttl", "l2_adapters": "--l2-adapter"}


def _choices(kind: type[enum.Enum]) -> str:
    return "[" + "|".join(m.value for m in kind) + "]"


def _show_version(value: bool) -> None:
    if value:
        # This package and the LMCache project's are both installed as `lmcache`: say which one this is.
        typer.echo(f"lmcache {__version__} (standalone server: a drop-in reimplementation of LMCache's "
                   f"multiprocess server, not the LMCache project's package)\n"
                   f"installed at {Path(__file__).resolve().parent}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """LMCache: a KV-cache server for LLM inference."""


@app.command()
def server(
    l1_size_gb: Annotated[
        float, typer.Option("--l1-size-gb", help="Size of the L1 CPU memory pool in GiB (required, > 0).", show_default=False)
    ],
    eviction_policy: Annotated[
        str, typer.Option("--eviction-policy", metavar=_choices(EvictionPolicy), help="What to evict when L1 is full (any case).")
    ] = EvictionPolicy.LONG_2Q.value,
    host: Annotated[str, typer.Option("--host", help="Interface for the ZMQ server (vLLM connects here).")] = "localhost",
    port: Annotated[int, typer.Option("--port", help="ZMQ port.")] = 5555,
    http_host: Annotated[str, typer.Option("--http-host", help="Interface for the HTTP admin server.")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP admin port (/healthcheck, /status, /metrics).")] = 8080,
    max_workers: Annotated[int, typer.Option("--max-workers", help="Threads that copy KV for stores and retrieves.")] = 1,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Tokens per cached chunk (a multiple of vLLM's block size).")] = 256,
    log_level: Annotated[str, typer.Option("--log-level", metavar=_choices(LogLevel), help="Logging verbosity.")] = LogLevel.INFO.value,
    l1_shm: Annotated[
        bool,
        typer.Option(
            "--l1-shm/--no-l1-shm",
            help="Keep L1 in POSIX shared memory so CPU engines can copy into it (lmcache_driven mode).",
        ),
    ] = True,
    lock_ttl: Annotated[
        float, typer.Option("--lock-ttl", help="Seconds after which a dead client's locks on cached chunks expire.")
    ] = 60.0,
    engine_ttl: Annotated[
        float, typer.Option("--engine-ttl", help="Seconds without a store or load after which an engine's registration is dropped.")
    ] = 600.0,
    gpu_copy: Annotated[
        str, typer.Option("--gpu-copy", metavar="staging|mapped",
                          help="How GPU engines' KV crosses PCIe: a device buffer and DMA, or kernels on mapped pinned L1.")
    ] = "staging",
    admin_token: Annotated[
        str, typer.Option("--admin-token", envvar="LMCACHE_ADMIN_TOKEN", show_default=False,
                          help="Bearer token that POST /clear-cache requires (off when empty). Prefer the "
                          "environment variable: a flag is visible to other users in the process list.")
    ] = "",
    curve_secret_key: Annotated[
        str, typer.Option("--curve-secret-key", metavar="FILE",
                          help="Encrypt the ZMQ port with CurveZMQ using this server certificate "
                          "(NAME.key_secret from `lmcache keygen`).")
    ] = "",
    curve_authorized_keys: Annotated[
        str, typer.Option("--curve-authorized-keys", metavar="DIR",
                          help="Only let in ZMQ clients whose public key (a *.key file) is in this directory.")
    ] = "",
    l2_adapter: Annotated[
        list[str] | None, typer.Option("--l2-adapter", metavar="JSON",
                                       help='A tier under L1, e.g. \'{"type": "disk", "path": "/var/cache/lmcache", '
                                       '"max_gb": 200}\', \'{"type": "redis", "url": "redis://host:6379/0"}\' or '
                                       '\'{"type": "redis-cluster", "nodes": ["host:7000"]}\' (Redis options: namespace, '
                                       'connections, timeout_ms). Repeat for several; lookups ask them in this order.')
    ] = None,
    l2_write_queue_mb: Annotated[
        float, typer.Option("--l2-write-queue-mb",
                            help="MiB of chunks waiting to be written to L2 (at most a quarter of L1); more stay L1-only.")
    ] = 1024.0,
    l2_prefetch_deadline_ms: Annotated[
        float, typer.Option("--l2-prefetch-deadline-ms", help="How long a lookup waits for chunks loading from L2.")
    ] = 50.0,
    default_quota_gb: Annotated[
        float, typer.Option("--default-quota-gb", help="L1 GiB each cache salt (tenant) may hold unless PUT /quota/{salt} "
                                                       "says otherwise; 0: no limit.")
    ] = 0.0,
) -> int:
    """Run the LMCache cache server (ZMQ for vLLM, HTTP for operators) until SIGINT or SIGTERM."""
    try:
        config = ServerConfig(
            l1_size_gb=l1_size_gb,
            eviction_policy=eviction_policy,  # type: ignore[arg-type]  # ServerConfig parses the name
            host=host,
            port=port,
            http_host=http_host,
            http_port=http_port,
            max_workers=max_workers,
            chunk_size=chunk_size,
            log_level=log_level,  # type: ignore[arg-type]  # ServerConfig parses the name
            lock_ttl_s=lock_ttl,
            l1_shm=l1_shm,
            gpu_copy=gpu_copy,
            engine_ttl_s=engine_ttl,
            admin_token=admin_token,
            curve_secret_key=curve_secret_key,
            curve_authorized_keys=curve_authorized_keys,
            l2_adapters=tuple(l2_adapter or ()),  # type: ignore[arg-type]  # ServerConfig parses the JSON
            l2_write_queue_mb=l2_write_queue_mb,
            l2_prefetch_deadline_ms=l2_prefetch_deadline_ms,
            default_quota_gb=default_quota_gb,
        )
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint=f"'{_FLAGS.get(e.field, '--' + e.field.replace('_', '-'))}'") from None
    from lmcache.server.app import run_server  # keeps `lmcache --help` and `ping` light

    return run_server(config)


@app.command()
def ping(
    host: Annotated[str, typer.Option("--host", help="Server host.")] = "localhost",
    port: Annotated[int, typer.Option("--port", help="Server ZMQ port.")] = 5555,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for an answer.")] = 2.0,
    curve_server_key: Annotated[
        str, typer.Option("--curve-server-key", metavar="KEY|FILE",
                          help="The server's CurveZMQ public key (z85) or its .key file, for a server with --curve-secret-key.")
    ] = "",
    curve_client_secret_file: Annotated[
        str, typer.Option("--curve-client-secret-file", metavar="FILE",
                          help="This client's .key_secret file, for a server with --curve-authorized-keys.")
    ] = "",
) -> int:
    """Ask a running server who it is and time a round trip; exits 1 when it does not answer."""
    from lmcache.client import MPClient, ServerError, ServerUnavailableError

    try:  # the connector's own checks, so a bad key is one usage line naming its flag
        ConnectorConfig(curve_server_key=curve_server_key, curve_client_secret_file=curve_client_secret_file)
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint=f"'--{e.field.replace('_', '-')}'") from None
    endpoint = zmq_endpoint(host, port)
    client = MPClient(host, port, timeout_s=timeout, curve_server_key=curve_server_key or None,
                      curve_client_secret_file=curve_client_secret_file or None)
    with client:
        try:
            hello = client.hello(client_name="lmcache ping")
            start = time.perf_counter()
            client.ping()
            rtt_ms = (time.perf_counter() - start) * 1000
        except (ServerUnavailableError, ServerError) as e:
            typer.echo(f"lmcache ping: error: {e}", err=True)
            return 1
    modes = ", ".join(hello.transfer_modes) or "none"
    typer.echo(f"LMCache server at {endpoint}")
    typer.echo(f"  version         {hello.server_version} (protocol {hello.protocol_version})")
    typer.echo(f"  server id       {hello.server_id}")
    typer.echo(f"  chunk size      {hello.chunk_size} tokens")
    typer.echo(f"  transfer modes  {modes}")
    typer.echo(f"  round trip      {rtt_ms:.3f} ms")
    return 0


@app.command()
def keygen(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the key pair (created if missing).")],
    name: Annotated[str, typer.Option("--name", help="File name of the pair: NAME.key and NAME.key_secret.")] = "lmcache",
) -> int:
    """Write a CurveZMQ key pair: NAME.key (public, hand it out) and NAME.key_secret (owner-only)."""
    from lmcache.security import load_public_key, write_keypair

    try:
        public_file, secret_file = write_keypair(directory, name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--name'") from None
    except OSError as e:  # an existing pair (never overwritten) or a directory we cannot write
        raise typer.BadParameter(str(e), param_hint="'DIR'") from None
    typer.echo(f"public key  {public_file}")
    typer.echo(f"secret key  {secret_file}")
    typer.echo(f"z85 public  {load_public_key(public_file).decode()}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a usage error is one line on stderr and exit status 2."""
    command = typer.main.get_command(app)
    try:
        status = command.main(args=argv, prog_name="lmcache", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else "Try 'lmcache --help'.")
        status = 0
    except click_exceptions.UsageError as e:
        where = e.ctx.command_path if e.ctx else "lmcache"
        message = " ".join(e.format_message().split())
        typer.echo(f"{where}: error: {message} (see '{where} --help')", err=True)
        status = 2
    except typer.Abort:
        status = 130
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
