"""Real Redis servers for tests and benchmarks: Debian's ``redis-server``, on free loopback ports,
each in a temporary directory of its own, stopped by PID. Nothing here is a mock.

``RedisServer`` is one standalone server (persistence off, as the README asks of production);
``RedisClusterNodes`` is three ``--cluster-enabled`` servers joined with ``redis-cli --cluster
create``. A server can be paused (SIGSTOP: a hung Redis), killed (SIGKILL) and started again on
the same port.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from lmcache.server.process import free_port, port_is_free

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
MISSING = "redis-server is not installed (scripts/test.sh installs Debian's package with apt-get)"


class RedisServer:
    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        assert REDIS_SERVER is not None, MISSING
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def node(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        assert REDIS_SERVER is not None, MISSING
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "no", "--protected-mode", "no", *self.extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not answer in {timeout_s} s")
            time.sleep(0.02)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterNodes:
    """Three masters on loopback, every slot assigned, no replicas."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(directory / f"node{i}", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000", port=_cluster_port())
            for i in range(size)
        ]

    @property
    def seeds(self) -> list[str]:
        return [n.node for n in self.nodes]

    def start(self, timeout_s: float = 60.0) -> RedisClusterNodes:
        assert REDIS_CLI is not None, MISSING
        for node in self.nodes:
            node.start()
        subprocess.run([REDIS_CLI, "--cluster", "create", *self.seeds, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + timeout_s
        while not all(_cluster_ok(n.client()) for n in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterNodes:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too, as Redis needs."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 45000)
        if all(port_is_free(p) for p in (port, port + 10000)):
            return port
    raise OSError("no free port pair for a Redis cluster node")


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text or "'cluster_state': 'ok'" in text
