"""Runs `lmcache server` as a child process and waits for it properly.

Used by the tests, the benchmarks and the simulator: everything that needs a real server
starts it the same way, waits on conditions with deadlines (never fixed sleeps), and stops it
with a signal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from lmcache.server.app import RUNNING_LINE


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback now (for fixed ports: a Redis node's, the README's)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Stops a child started with ``start_new_session=True`` and all it started: SIGTERM to its
    process group, then SIGKILL if it overstays."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def lmcache_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m lmcache.cli``."""
    script = Path(sys.executable).with_name("lmcache")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmcache.cli"]


class ServerProcess:
    """One `lmcache server` child on loopback ports; its output is collected line by line."""

    def __init__(
        self,
        l1_size_gb: float = 0.25,
        port: int | None = None,
        http_port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.args = [
            *lmcache_command(), "server",
            "--l1-size-gb", str(l1_size_gb),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
            *extra_args,
        ]
        self.lines: list[str] = []
        self._eof = False  # the child closed its output (it has exited)
        self._changed = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 30.0) -> ServerProcess:
        """Starts the server and returns once it logs that it runs and /healthcheck says healthy."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        self.wait_for_line(RUNNING_LINE, deadline - time.monotonic())
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server never became healthy:\n{self.output()}")
            with self._changed:
                self._changed.wait(0.05)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/healthcheck", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout_s: float = 10.0) -> str:
        """The first output line containing ``text``; raises if it does not appear in time."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    raise TimeoutError(f"no line containing {text!r}; output so far:\n" + "\n".join(self.lines))
                self._changed.wait(min(remaining, 0.1))

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        """Sends ``sig`` and returns the exit status (killing the process if it overstays)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
