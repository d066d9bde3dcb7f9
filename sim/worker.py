"""One engine rank: its paged KV cache, the connector's WorkerAdapter, and the forward pass.

``WorkerProcess`` runs a ``SimWorker`` in a process of its own, as vLLM runs each rank, and
calls it step by step over a pipe. A step runs in vLLM's worker order: start the loads planned
this step, (check the bytes of requests whose load has finished,) run the forward pass, hand the
stores over, report finished loads and stores.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmcache.client import MPClient
from lmcache.config import ConnectorConfig, strip_scheme
from lmcache.integration.vllm.adapter import StepMetadata, WorkerAdapter
from lmcache.kv_transfer import TransferStats
from sim.leftovers import remove_files_of
from sim.model import ModelSpec, kv_values, spans, token_view


@dataclass(frozen=True)
class Span:
    """Tokens at positions [start, start + len(tokens)) of a request, in its blocks."""

    req_id: str
    blocks: list[int]
    start: int
    tokens: list[int]


@dataclass(frozen=True)
class Mismatch:
    request: str
    chunk: int
    rank: int
    layer: int
    offset: int
    bytes: int

    def __str__(self) -> str:
        return (f"request {self.request} chunk {self.chunk} rank {self.rank} layer {self.layer}: "
                f"{self.bytes} wrong bytes from offset {self.offset}")


@dataclass
class StepResult:
    finished_sending: set[str]
    finished_recving: set[str]
    load_errors: set[int]
    mismatches: list[Mismatch]


@dataclass
class SimWorker:
    spec: ModelSpec
    config: ConnectorConfig
    rank: int
    world_size: int
    instance_id: str
    chunk_size: int
    kv: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.kv = self.spec.make_kv()
        for t in self.kv:  # touch every page now, as a warmed-up engine has: no first-touch faults later
            t.fill_(0)
        client = MPClient(strip_scheme(self.config.host), self.config.port, timeout_s=self.config.timeout_s)
        self.adapter = WorkerAdapter(self.config, self.spec.name, self.world_size, self.rank, client=client,
                                     instance_id=self.instance_id)
        self.adapter.register(self.kv)

    def step(self, meta: StepMetadata, verify: list[Span], forward: list[Span], finished: set[str],
             idle: bool) -> StepResult:
        a = self.adapter
        a.handle_preemptions(meta)
        a.start_load(meta)
        mismatches = [m for span in verify for m in self._check(span)]
        for span in forward:
            self._write(span)
        a.save(meta)
        if idle:  # nothing to compute: wait a little for the I/O instead of spinning
            try:
                a.flush(0.005)
            except TimeoutError:
                pass
        sending, recving = a.get_finished(finished)
        return StepResult(sending, recving, a.take_load_errors(), mismatches)

    def _write(self, span: Span) -> None:
        bs = self.spec.block_size
        end = span.start + len(span.tokens)
        for layer, t in enumerate(self.kv):
            values = kv_values(self.spec, self.rank, layer, span.tokens, span.start)
            for block, slot, i, n in spans(span.blocks, bs, span.start, end):
                token_view(t, block)[slot : slot + n] = values[i : i + n]

    def _check(self, span: Span) -> list[Mismatch]:
        bs = self.spec.block_size
        end = span.start + len(span.tokens)
        found = []
        for layer, t in enumerate(self.kv):
            want = kv_values(self.spec, self.rank, layer, span.tokens, span.start)
            for block, slot, i, n in spans(span.blocks, bs, span.start, end):
                got = token_view(t, block)[slot : slot + n].contiguous().view(torch.uint8).numpy().ravel()
                exp = want[i : i + n].contiguous().view(torch.uint8).numpy().ravel()
                bad = np.flatnonzero(got != exp)
                if bad.size:
                    position = span.start + i
                    found.append(Mismatch(span.req_id, position // self.chunk_size, self.rank, layer,
                                          int(bad[0]), int(bad.size)))
        return found

    def close(self) -> TransferStats:
        stats = self.adapter.transfer_stats or TransferStats()
        self.adapter.close()
        return stats


def _serve(conn: Any, kwargs: dict[str, Any]) -> None:
    # A Ctrl-C reaches every process of the terminal's group: the parent stops this rank in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = SimWorker(**kwargs)
        conn.send(("ok", None))
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        call = conn.recv()
        try:
            if call is None:
                conn.send(("ok", worker.close()))
                return
            conn.send(("ok", worker.step(*call)))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
            return


ANSWER_S = 120  # the longest a rank may take over one call (a step, its start, its close)


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """While a rank starts: it inherits SIGINT ignored, so that a Ctrl-C during its imports (before
    ``_serve`` ignores it itself) does not kill it with a traceback; the parent handles the Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class WorkerProcess:
    """A SimWorker in its own process. ``send_step`` and ``result`` are split so that every rank
    works on a step at the same time."""

    def __init__(self, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kwargs), daemon=True,
                                name=f"sim-rank-{kwargs['instance_id']}")
        with sigint_ignored():
            self.proc.start()
        child.close()
        self._pending = False  # a step was sent whose result has not been taken

    def ready(self) -> None:
        self._receive()

    def send_step(self, meta: StepMetadata, verify: list[Span], forward: list[Span], finished: set[str],
                  idle: bool) -> None:
        self._conn.send((meta, verify, forward, finished, idle))
        self._pending = True

    def result(self) -> StepResult:
        result = self._receive()
        self._pending = False
        return result

    def close(self) -> TransferStats:
        self._conn.send(None)
        transfers = self._receive()
        self.proc.join(10)
        return transfers

    def stop(self, deadline: float, abandon: Callable[[], bool]) -> TransferStats | None:
        """After an interrupt: takes the rank's pending step result, closes it (its adapter finishes
        its I/O) and returns what it moved; kills it instead, returning None, at ``deadline`` or as
        soon as ``abandon()`` (its I/O could only time out: the server is gone)."""
        try:
            if self._pending:
                self._receive(deadline, abandon)
                self._pending = False
            self._conn.send(None)
            transfers: TransferStats = self._receive(deadline, abandon)
        except Exception:  # noqa: BLE001 - any failure here (pipe cut mid-message, rank dead) ends in kill()
            self.kill()
            return None
        self.proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()
        return transfers

    def kill(self) -> None:
        """Ends the rank if it still runs, then removes what it left in /dev/shm."""
        if self.proc.pid is None:
            return
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        if self.proc.exitcode is not None:
            remove_files_of(self.proc.pid)

    def _receive(self, deadline: float | None = None, abandon: Callable[[], bool] = lambda: False) -> Any:
        limit = time.monotonic() + ANSWER_S if deadline is None else deadline
        while not self._conn.poll(0.05):
            if not self.proc.is_alive() and not self._conn.poll(0):  # it may have answered, then exited
                raise self._died()
            if abandon() or time.monotonic() > limit:
                raise RuntimeError(f"{self.proc.name} did not answer within {ANSWER_S} s" if deadline is None
                                   else f"{self.proc.name} was given up on")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise self._died() from None
        if status != "ok":
            raise RuntimeError(f"{self.proc.name} failed:\n{value}")
        return value

    def _died(self) -> RuntimeError:
        self.proc.join(1)
        code = self.proc.exitcode
        why = " (killed: out of memory? see --memory-gb)" if code == -signal.SIGKILL else ""
        return RuntimeError(f"{self.proc.name} exited with status {code}{why}")
