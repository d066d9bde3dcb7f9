"""Starting and stopping `lmcache server`: flags, busy ports, signals, clean release of ports."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import lmcache
from lmcache.client import MPClient
from lmcache.server.process import ServerProcess, free_port, lmcache_command


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lmcache_command(), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--l1-size-gb", "0"], "--l1-size-gb"),
        (["--l1-size-gb", "-3"], "--l1-size-gb"),
        (["--l1-size-gb", "lots"], "--l1-size-gb"),
        (["--l1-size-gb", "inf"], "--l1-size-gb"),
        (["--l1-size-gb", "1e400"], "--l1-size-gb"),
        (["--l1-size-gb", "nan"], "--l1-size-gb"),
        (["--l1-size-gb", "1e-9"], "--l1-size-gb"),
        (["--l1-size-gb", "1", "--eviction-policy", "nope"], "--eviction-policy"),
        (["--l1-size-gb", "1", "--port", "70000"], "--port"),
        (["--l1-size-gb", "1", "--http-port", "0"], "--http-port"),
        (["--l1-size-gb", "1", "--port", "9000", "--http-port", "9000"], "--http-port"),
        (["--l1-size-gb", "1", "--max-workers", "0"], "--max-workers"),
        (["--l1-size-gb", "1", "--chunk-size", "0"], "--chunk-size"),
        (["--l1-size-gb", "1", "--log-level", "loud"], "--log-level"),
        (["--l1-size-gb", "1", "--lock-ttl", "0"], "--lock-ttl"),
        (["--l1-size-gb", "1", "--lock-ttl", "inf"], "--lock-ttl"),  # every number must be finite
        (["--l1-size-gb", "1", "--l2-write-queue-mb", "inf"], "--l2-write-queue-mb"),
        (["--l1-size-gb", "1", "--l2-adapter", '{"type": "disk", "path": "/tmp/a\\u0000b", "max_gb": 1}'], "--l2-adapter"),
        ([], "--l1-size-gb"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], flag: str) -> None:
    out = _run("server", *args)
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert flag in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_an_l1_larger_than_memory_is_refused_with_one_line() -> None:
    out = _run("server", "--l1-size-gb", "100000", "--port", str(free_port()), "--http-port", str(free_port()))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, out.stderr
    assert "--l1-size-gb 100000 asks for 100000.0 GiB but only" in errors[0]
    assert "GiB of memory is available" in errors[0]
    assert "Traceback" not in out.stderr


def test_eviction_policy_accepts_any_case() -> None:
    with ServerProcess(extra_args=["--eviction-policy", "lru"]) as server:
        with MPClient("127.0.0.1", server.port) as c:
            assert c.status()["config"]["eviction_policy"] == "LRU"


def test_help_lists_flags_and_choices() -> None:
    top = _run("--help")
    assert top.returncode == 0
    assert "server" in top.stdout and "ping" in top.stdout
    out = _run("server", "--help")
    assert out.returncode == 0
    for flag in ("--l1-size-gb", "--eviction-policy", "--host", "--port", "--http-host", "--http-port",
                 "--max-workers", "--chunk-size", "--log-level"):
        assert flag in out.stdout
    assert "LRU" in out.stdout


@pytest.mark.parametrize("which", ["zmq", "http"])
def test_busy_port_gives_a_clear_error(which: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        port, http_port = (busy, free_port()) if which == "zmq" else (free_port(), busy)
        out = _run("server", "--l1-size-gb", "0.1", "--host", "127.0.0.1", "--port", str(port),
                   "--http-host", "127.0.0.1", "--http-port", str(http_port))
    assert out.returncode == 1
    flag = "--port" if which == "zmq" else "--http-port"
    assert f"port {busy} on 127.0.0.1 is already in use (change it with {flag})" in out.stderr
    assert "Traceback" not in out.stderr


def test_version_says_which_lmcache_this_is() -> None:
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("lmcache 0.1.0 (standalone server") and "not the LMCache project's package" in out.stdout
    assert str(Path(lmcache.__file__).resolve().parent) in out.stdout


STAMP = r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\]$"


def test_every_log_line_has_the_spec_form_then_a_timestamp() -> None:
    with ServerProcess(l1_size_gb=0.1) as server:
        line = server.wait_for_line("cache server is running")
        assert re.fullmatch(r"LMCache INFO: LMCache cache server is running\.\.\." + STAMP, line), line
        resident = server.wait_for_line("L1 resident", timeout_s=60)
        assert re.fullmatch(r"LMCache INFO: L1 resident: \d+ MiB in [\d.]+ seconds" + STAMP, resident), resident
        start = server.wait_for_line("Starting LMCache server")
        # Readable: words, not a Python dict.
        assert "L1 0.1 GiB (2Q-LONG eviction)" in start and f"ZMQ on 127.0.0.1:{server.port}" in start and "{" not in start
    assert all(re.match(r"LMCache (DEBUG|INFO|WARNING|ERROR|CRITICAL): ", line) and re.search(STAMP, line)
               for line in server.lines), server.output()


def test_a_terminal_gets_no_warning_about_flags_lmcache_does_not_have() -> None:
    """Sanic warns about its "PRODUCTION mode" and its own --debug/--dev flags, on a TTY only."""
    port, http_port = free_port(), free_port()
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*lmcache_command(), "server", "--l1-size-gb", "0.05", "--host", "127.0.0.1", "--port", str(port),
         "--http-host", "127.0.0.1", "--http-port", str(http_port)],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"cache server is running" not in seen and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(controller, 65536)
                except OSError:  # the process closed the terminal
                    break
        assert b"cache server is running" in seen, seen.decode(errors="replace")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        os.close(controller)
    text = seen.decode(errors="replace")
    assert "PRODUCTION" not in text and "--dev" not in text and "Sanic" not in text, text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_within_5s_and_frees_the_ports(sig: int) -> None:
    server = ServerProcess().start()
    with MPClient("127.0.0.1", server.port) as c:
        c.ping()  # a live client connection must not hold the server up
        start = time.monotonic()
        status = server.stop(sig, timeout_s=5.0)
        assert time.monotonic() - start < 5.0
    assert status == 0, server.output()
    assert "LMCache INFO: LMCache server stopped" in server.output()
    again = ServerProcess(port=server.port, http_port=server.http_port).start()
    try:
        with MPClient("127.0.0.1", again.port) as c:
            assert c.hello().chunk_size == 256
    finally:
        assert again.stop() == 0


def test_client_reconnects_after_a_restart() -> None:
    first = ServerProcess().start()
    client = MPClient("127.0.0.1", first.port, timeout_s=5.0)
    try:
        first_id = client.hello().server_id
        assert first.stop() == 0
        second = ServerProcess(port=first.port, http_port=first.http_port).start()
        try:
            assert client.hello().server_id != first_id
        finally:
            second.stop()
    finally:
        client.close()
