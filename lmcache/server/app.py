"""Starts one server process: the CacheEngine, its ZMQ face and its HTTP face; stops them cleanly.

Both ports are bound before anything is announced, so a busy port is one clear error at start.
SIGINT and SIGTERM stop the HTTP server, then the ZMQ loop, then the engine, and the process
exits 0. If the ZMQ loop ever dies, /healthcheck answers 503 at once and the process stops and
exits 1, so a supervisor (systemd, a Kubernetes probe) restarts it instead of keeping a server
that answers health checks but no engine.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import threading
import time

from lmcache import __version__
from lmcache.config import GIB, ServerConfig
from lmcache.log import init_logger, set_level
from lmcache.server.engine import CacheEngine
from lmcache.server.http import build_app
from lmcache.server.metrics import ServerMetrics
from lmcache.server.zmq_loop import PortInUseError, ZmqServer

logger = init_logger(__name__)

RUNNING_LINE = "LMCache cache server is running..."


def _bind_http(config: ServerConfig) -> socket.socket:
    try:
        return socket.create_server((config.http_host, config.http_port), backlog=128)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError("HTTP", config.http_host, config.http_port, "--http-port") from None
        raise OSError(f"cannot listen for HTTP on {config.http_host}:{config.http_port}: {e.strerror}") from e


def run_server(config: ServerConfig) -> int:
    """Runs until SIGINT/SIGTERM; returns the process exit status."""
    set_level(config.log_level.value)
    logger.info("Starting LMCache server %s: %s", __version__, describe(config))
    logger.debug("Configuration: %s", config.as_dict())
    try:
        engine = CacheEngine(config)
    except (MemoryError, OSError) as e:
        logger.error("%s", e)
        return 2
    metrics = ServerMetrics(engine)
    failure = _Failure()
    try:
        zmq_server = ZmqServer(config, engine, metrics, on_failure=lambda reason: failure.report(engine, reason))
    except OSError as e:
        logger.error("%s", e)
        engine.close()
        return 1
    try:
        http_sock = _bind_http(config)
    except OSError as e:
        logger.error("%s", e)
        zmq_server.stop()
        engine.close()
        return 1
    try:
        asyncio.run(_serve(config, engine, metrics, zmq_server, http_sock, failure))
    finally:
        zmq_server.stop()
        http_sock.close()
        engine.close()
    if failure.reason:
        logger.error("LMCache server stopped: %s", failure.reason)
        return 1
    logger.info("LMCache server stopped")
    return 0


def describe(config: ServerConfig) -> str:
    """The start line: what an operator checks first, in words."""
    l2 = ", ".join(a.type for a in config.l2_adapters) or "none"
    quota = f"{config.default_quota_gb:g} GiB" if config.default_quota_gb else "none"
    access = "on" if config.admin_token or config.curve_secret_key else "off"
    return (f"L1 {config.l1_size_gb:g} GiB ({config.eviction_policy.value} eviction), "
            f"chunks of {config.chunk_size} tokens, ZMQ on {config.host}:{config.port}, "
            f"HTTP on {config.http_host}:{config.http_port}, {config.max_workers} copy worker(s), "
            f"L2 tiers: {l2}, default quota: {quota}, access control: {access}")


def _log_when_resident(engine: CacheEngine) -> None:
    """Logs once the whole L1 pool is in memory (mapped at start, faulted in the background)."""
    start = time.monotonic()
    pool = engine.l1.pool

    def wait() -> None:
        while not pool.wait_prefaulted(0.5):
            if engine.stopping:
                return
        if not engine.stopping:
            size = f"{pool.size / GIB:.2f} GiB" if pool.size >= GIB else f"{pool.size / (1 << 20):.0f} MiB"
            logger.info("L1 resident: %s in %.1f seconds", size, time.monotonic() - start)

    threading.Thread(target=wait, name="lmcache-resident", daemon=True).start()


class _Failure:
    """What stops the server from inside: set once, from any thread."""

    def __init__(self) -> None:
        self.reason = ""
        self._stop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def report(self, engine: CacheEngine, reason: str) -> None:
        self.reason = self.reason or reason
        engine.fail(reason)  # /healthcheck says so from now on
        if self._stop is not None:
            loop, stop = self._stop
            loop.call_soon_threadsafe(stop.set)


async def _serve(
    config: ServerConfig,
    engine: CacheEngine,
    metrics: ServerMetrics,
    zmq_server: ZmqServer,
    http_sock: socket.socket,
    failure: _Failure,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failure._stop = (loop, stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    app = build_app(engine, metrics)
    # Sanic warns on a terminal about a "PRODUCTION mode" and flags of its own CLI, which this
    # server does not have; lmcache's own log says what runs.
    os.environ.setdefault("SANIC_IGNORE_PRODUCTION_WARNING", "1")
    http = await app.create_server(sock=http_sock, return_asyncio_server=True, access_log=False)
    assert http is not None
    await http.startup()
    await http.before_start()
    await http.start_serving()
    zmq_server.start()
    engine.start()
    _log_when_resident(engine)
    logger.info("ZMQ server listening on %s", zmq_server.endpoint)
    logger.info("HTTP server listening on http://%s:%d", config.http_host, config.http_port)
    logger.info(RUNNING_LINE)
    await http.after_start()

    await stop.wait()
    logger.info("Shutting down")
    engine.begin_shutdown()
    await http.before_stop()
    http.close()
    await http.wait_closed()
    await http.after_stop()
    zmq_server.stop()
