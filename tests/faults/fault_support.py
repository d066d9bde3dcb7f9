"""Shared pieces of the fault suite: a real server that can be replaced when a fault breaks it,
raw DEALER sockets, a canary chunk stored byte-exact before the faults, and the "is it still
serving" check every fault test ends with.

Not a test module (pytest collects test_*.py only); the test modules import it by name, since
pytest puts this folder on sys.path (there is no __init__.py in tests/).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import msgspec
import zmq

from lmcache import protocol as p
from lmcache.client import MPClient
from lmcache.kv_transfer import KVTransfer, register_kv_caches
from lmcache.keys import prompt_hashes
from lmcache.server.process import ServerProcess

CHUNK = 64  # tokens per chunk: 4 blocks of make_kv's 16 tokens
SERVER_ARGS = ("--chunk-size", str(CHUNK), "--max-workers", "2")
WRAPPER = Path(__file__).with_name("server_wrapper.py")
REPLY_DEADLINE_S = 2.0  # every request that gets a reply gets it within this
PING_DEADLINE_S = 1.0  # a fresh client's Ping after a batch of faults
FORGED = "LMCache ERROR: forged"  # planted in hostile strings; must never start a server line
# A frame no msgpack encoder produces (0xc1 is the one reserved byte): the wrapper's trigger.
KILL_FRAME = b"\xc1LMCACHE-FAULT-KILL-ZMQ-LOOP"


def start_server(
    extra_args: Sequence[str] = SERVER_ARGS,
    *,
    address_space_gb: float | None = None,
    kill_frame: bytes | None = None,
) -> ServerProcess:
    """A started `lmcache server` child. With ``address_space_gb`` or ``kill_frame`` it runs
    through server_wrapper.py, which caps its memory (so a runaway allocation in the server
    fails inside it instead of eating the machine) or plants a fault that kills its ZMQ loop."""
    server = ServerProcess(extra_args=list(extra_args))
    if address_space_gb is not None or kill_frame is not None:
        server.args = [sys.executable, str(WRAPPER), *server.args[server.args.index("server"):]]
        env = {}
        if address_space_gb is not None:
            env["LMCACHE_FAULT_ADDRESS_SPACE"] = str(int(address_space_gb * (1 << 30)))
        if kill_frame is not None:
            env["LMCACHE_FAULT_KILL_FRAME"] = kill_frame.hex()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # ServerProcess.start passes os.environ to the child
        try:
            return server.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return server.start()


# ServerProcess appends the child's output lines to .lines under its ._changed condition.


def output_since(server: ServerProcess, first_line: int) -> str:
    with server._changed:
        return "\n".join(server.lines[first_line:])


def line_count(server: ServerProcess) -> int:
    with server._changed:
        return len(server.lines)


def forged_lines(server: ServerProcess, first_line: int = 0) -> list[str]:
    with server._changed:
        return [line for line in server.lines[first_line:] if line.startswith(FORGED)]


def uncaught_lines(server: ServerProcess, first_line: int = 0) -> list[str]:
    """Output lines since ``first_line`` that report an exception nobody handled."""
    with server._changed:
        return [line for line in server.lines[first_line:]
                if line.startswith("Traceback") or "uncaught" in line or line.startswith("Exception in thread")]


def sync_output(server: ServerProcess, timeout_s: float = 2.0) -> None:
    """Returns once everything the server logged before this call has been read: it logs a
    marker (a Hello's client name) and waits for it, since its output is read asynchronously."""
    marker = f"fault-sync-{random.getrandbits(48):012x}"
    try:
        with MPClient("127.0.0.1", server.port, timeout_s=timeout_s) as client:
            client.hello(client_name=marker)
        server.wait_for_line(marker, timeout_s)
    except Exception:  # noqa: BLE001 - a server that cannot do this fails the serving check instead
        pass


def loop_death_lines(server: ServerProcess) -> list[str]:
    """Output that says a server thread died of an exception nobody caught."""
    with server._changed:
        return [line for line in server.lines if line.startswith("Exception in thread")]


# --- raw sockets ----------------------------------------------------------------------------


class RawDealer:
    """A bare DEALER socket: what it sends reaches the ROUTER as [identity, *frames]."""

    def __init__(self, port: int, ctx: zmq.Context | None = None) -> None:
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        # Closing right after a send must still deliver it (a bounded wait, for a dead peer).
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def send(self, frames: Sequence[bytes]) -> None:
        self.sock.send_multipart(list(frames), copy=len(frames) == 0 or max(map(len, frames)) < 65536)

    def recv(self, timeout_s: float) -> list[bytes] | None:
        """The next message, or None if none comes within ``timeout_s``."""
        if self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return self.sock.recv_multipart()
        return None

    def request(self, frames: Sequence[bytes], timeout_s: float = REPLY_DEADLINE_S) -> tuple[list[bytes] | None, float]:
        """Sends ``frames`` and waits for one reply: (reply frames or None, seconds taken)."""
        start = time.monotonic()
        self.send(frames)
        reply = self.recv(timeout_s)
        return reply, time.monotonic() - start

    def close(self) -> None:
        self.sock.close()
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> RawDealer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def decode_reply_frames(frames: list[bytes]) -> tuple[bytes, p.Reply]:
    """[request id, reply] -> (request id, decoded reply); raises AssertionError otherwise."""
    assert len(frames) == 2, f"a reply is [request id, message], got {len(frames)} frames: {frames!r:.300}"
    try:
        return frames[0], p.decode_reply(frames[1])
    except p.ProtocolError as e:
        raise AssertionError(f"the server sent an undecodable reply {frames[1]!r:.300}: {e}") from None


# --- the canary chunk ------------------------------------------------------------------------


@dataclass
class Canary:
    """Two chunks stored through a registered engine_driven KV cache before any fault; after
    the faults they must still load back byte for byte."""

    client: MPClient
    registration: KVTransfer
    kv: list[Any]
    hashes: bytes
    expected: list[list[bytes]]  # per layer, per chunk block: the stored bytes
    src_blocks: list[int] = field(default_factory=lambda: list(range(8)))
    dst_blocks: list[int] = field(default_factory=lambda: list(range(16, 24)))

    @classmethod
    def store(cls, server: ServerProcess) -> Canary:
        from lmcache.testing.vllm_like import block_bytes, fill, make_kv

        client = MPClient("127.0.0.1", server.port, timeout_s=10)
        kv = make_kv("LBHNC", "bfloat16")
        fill(kv, "LBHNC", seed=3)
        reg = register_kv_caches(client, kv, model="fault-canary", instance_id="fault-canary", mode="engine_driven")
        hashes = prompt_hashes(random.Random(7).choices(range(30_000), k=2 * CHUNK), CHUNK)
        src = list(range(8))
        expected = [[block_bytes(t, "LBHNC", b) for b in src] for t in kv]
        reply = reg.store(hashes, src)
        assert (reply.stored, reply.present, reply.skipped) == (2, 0, 0), reply
        return cls(client, reg, kv, hashes, expected, src)

    def check(self) -> None:
        """Zeroes the engine's blocks, loads the chunks back and compares every byte."""
        from lmcache.testing.vllm_like import block_bytes

        for t in self.kv:
            t.zero_()
        got = self.registration.retrieve(self.hashes, self.dst_blocks, timeout=5).retrieved
        assert got == 2, f"the canary chunks stored before the faults: {got} of 2 load back"
        for layer, t in enumerate(self.kv):
            for i, dst in enumerate(self.dst_blocks):
                assert block_bytes(t, "LBHNC", dst) == self.expected[layer][i], \
                    f"canary layer {layer} block {i} came back different"

    def close(self) -> None:
        self.client.close()


# --- "is it still serving?" --------------------------------------------------------------------


def health(server: ServerProcess, timeout_s: float = 2.0) -> tuple[int, Any]:
    """(status, JSON body) of GET /healthcheck; (0, error text) if it cannot be reached."""
    try:
        r = httpx.get(f"{server.http_url}/healthcheck", timeout=timeout_s)
    except httpx.HTTPError as e:
        return 0, f"{type(e).__name__}: {e}"
    try:
        return r.status_code, r.json()
    except json.JSONDecodeError:
        return r.status_code, r.text


def serving_problem(server: ServerProcess, canary: Canary | None = None) -> str | None:
    """Why the server is not serving properly, or None: the process runs, a fresh client's
    Ping answers within a second, /healthcheck says healthy, no thread died, and the canary
    chunks (if any) load back byte-exact."""
    assert server.proc is not None
    if server.proc.poll() is not None:
        return f"the server process exited with status {server.proc.returncode}"
    start = time.monotonic()
    with MPClient("127.0.0.1", server.port, timeout_s=PING_DEADLINE_S) as fresh:
        try:
            pong = fresh.ping()
        except Exception as e:  # noqa: BLE001 - the symptom is the report
            return f"a fresh client's Ping got no Pong within {PING_DEADLINE_S} s ({type(e).__name__}: {e})"
    if not isinstance(pong, p.Pong) or time.monotonic() - start > PING_DEADLINE_S + 0.5:
        return f"Ping answered {pong!r} after {time.monotonic() - start:.2f} s"
    status, body = health(server)
    if (status, body) != (200, {"status": "healthy"}):
        return f"GET /healthcheck answered {status} {body!r}"
    dead = loop_death_lines(server)
    if dead:
        return f"a server thread died: {dead}"
    if canary is not None:
        try:
            canary.check()
        except Exception as e:  # noqa: BLE001
            return f"canary: {type(e).__name__}: {e}"
    return None


class LiveServer:
    """A module's server, replaced by a fresh one when a fault leaves it broken, so that one
    fatal input is reported once instead of failing every test after it.

    ``prepare(server)`` runs against every server started (the first and each replacement):
    what it returns is kept as ``state`` (closed, if it has ``close``, when the server goes).
    """

    def __init__(self, *, with_canary: bool = False, address_space_gb: float | None = None,
                 extra_args: Sequence[str] = SERVER_ARGS,
                 prepare: Callable[[ServerProcess], Any] | None = None) -> None:
        self._with_canary = with_canary
        self._address_space_gb = address_space_gb
        self._extra_args = tuple(extra_args)
        self._prepare = prepare
        self.restarts = 0
        self.canary: Canary | None = None
        self.state: Any = None
        self.server = self._start()

    def _start(self) -> ServerProcess:
        server = start_server(self._extra_args, address_space_gb=self._address_space_gb)
        self.canary = Canary.store(server) if self._with_canary else None
        self.state = self._prepare(server) if self._prepare is not None else None
        return server

    def _release(self) -> None:
        for held in (self.canary, self.state):
            close = getattr(held, "close", None)
            if close is not None:
                close()

    @property
    def port(self) -> int:
        return self.server.port

    def problem(self) -> str | None:
        return serving_problem(self.server, self.canary)

    def restart(self) -> str:
        """Stops (kills, if it overstays) the broken server, starts a fresh one; returns the old
        one's output, for the report."""
        old = self.server
        self._release()
        try:
            old.stop(timeout_s=5)
        except Exception:  # noqa: BLE001 - it was killed; its output is what matters
            pass
        self.restarts += 1
        self.server = self._start()
        return old.output()

    def close(self, check: bool = True) -> None:
        """Stops the server; with ``check``, asserts it still served and exited cleanly (exit
        status 0 on SIGTERM, no thread died along the way)."""
        try:
            problem = self.problem() if check else None
        finally:
            self._release()
            status = self.server.stop(signal.SIGTERM, timeout_s=10)
        if check:
            assert problem is None, f"after the faults: {problem}\n{tail(self.server.output(), 40)}"
            assert status == 0, f"exit status {status} on SIGTERM after the faults\n{tail(self.server.output(), 40)}"


# --- fuzzing: bounded, seeded, and every bad input collected rather than the first only --------

# One seed per run (or LMCACHE_FAULT_SEED=<n> to replay one); every failure report prints it.
SEED = int(os.environ.get("LMCACHE_FAULT_SEED") or random.SystemRandom().getrandbits(32))
MAX_RESTARTS = 3  # per test: past this, the server is too broken to learn more from it


def fuzz_settings(max_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Applied above @given: bounded, no deadline per example, seeded with SEED."""
    settings = hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=False,
        database=None,  # no .hypothesis/ folder in the repository
        print_blob=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        # No shrinking: the tests collect every bad input themselves (a shrink step that breaks
        # the server costs a restart); generation already favours small inputs.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )

    def apply(test: Callable[..., None]) -> Callable[..., None]:
        return hypothesis.seed(SEED)(settings(test))

    return apply


@dataclass
class Problems:
    """Bad inputs found by one fuzz test: (input, symptom, server output excerpt)."""

    found: list[tuple[str, str, str]] = field(default_factory=list)
    gave_up: bool = False
    total: int = 0
    restarts: int = 0

    def add(self, what: str, symptom: str, output: str = "") -> None:
        # The same symptom from many inputs is one finding: keep the first few of each.
        if sum(1 for _, s, _ in self.found if s == symptom) < 3:
            self.found.append((what, symptom, output))
        self.total += 1

    def check_server(self, live: LiveServer, what: str, since_line: int) -> None:
        """Records ``what`` if the server stopped serving properly after it, and replaces the
        server (up to MAX_RESTARTS times)."""
        problem = live.problem()
        if problem is None:
            return
        output = output_since(live.server, since_line)
        self.add(what, problem, exception_lines(output) or tail(output))
        self.restarts += 1
        self.gave_up = self.restarts >= MAX_RESTARTS  # the fuzzing stops; later tests get a fresh server
        live.restart()

    def __bool__(self) -> bool:
        return bool(self.found)

    def report(self) -> str:
        lines = [f"{self.total} bad input(s), {len(self.found)} shown (LMCACHE_FAULT_SEED={SEED} replays this run):"]
        for i, (what, symptom, output) in enumerate(self.found[:25], 1):
            lines.append(f"[{i}] input: {what}\n    symptom: {symptom}")
            if output:
                lines.append("    server output:\n      " + output.replace("\n", "\n      "))
        if len(self.found) > 25:
            lines.append(f"... and {len(self.found) - 25} more")
        if self.gave_up:
            lines.append(f"(stopped after {MAX_RESTARTS} server restarts)")
        return "\n".join(lines)


def short_repr(value: Any, limit: int = 300) -> str:
    """repr() that summarizes long bytes/str/lists instead of printing megabytes."""
    if isinstance(value, (bytes, bytearray)) and len(value) > 64:
        head = bytes(value[:24])
        if value == head[:1] * len(value):
            return f"{head[:1]!r} * {len(value)}"
        return f"<{len(value)} bytes: {head!r}...>"
    if isinstance(value, str) and len(value) > 80:
        return f"<str of {len(value)}: {value[:30]!r}...>"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)}: [{', '.join(short_repr(v, 60) for v in value[:3])}, ...]>"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(short_repr(v, limit) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, msgspec.msgpack.Ext):
        return f"Ext({value.code}, {short_repr(value.data, 60)})"
    if isinstance(value, dict):
        inner = ", ".join(f"{short_repr(k, 60)}: {short_repr(v, 120)}" for k, v in list(value.items())[:8])
        return "{" + inner + (", ...}" if len(value) > 8 else "}")
    if isinstance(value, msgspec.Struct):
        fields = ", ".join(f"{f}={short_repr(getattr(value, f), 120)}" for f in value.__struct_fields__)
        return f"{type(value).__name__}({fields})"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def exception_lines(text: str) -> str:
    """The interesting part of a server's output: tracebacks and error lines."""
    keep = [line for line in text.splitlines()
            if "Error" in line or "Exception" in line or "Traceback" in line or line.startswith("  File")]
    return "\n".join(keep[-30:])


def raw_http(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Sends raw bytes to the HTTP port, half-closes, and reads until the server closes (or
    the deadline passes); returns what came back."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close on us mid-request; what it sent is still readable
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_codes(response: bytes) -> list[int]:
    """The status code of every response in ``response`` (a connection may carry several,
    pipelined back to back)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", response)]
