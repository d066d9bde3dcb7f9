"""One engine rank: its paged KV cache, the connector's WorkerAdapter, and the forward pass.

``WorkerProcess`` runs a ``SimWorker`` in a process of its own, as vLLM runs each rank, and
calls it step by step over a pipe. A step runs in vLLM's worker order: start the loads planned
this step, (check the bytes of requests whose load has finished,) run the forward pass, hand the
stores over, report finished loads and stores.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmcache.client import MPClient
from lmcache.config import ConnectorConfig, strip_scheme
from lmcache.integration.vllm.adapter import StepMetadata, WorkerAdapter
from lmcache.kv_transfer import TransferStats
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


class WorkerProcess:
    """A SimWorker in its own process. ``send_step`` and ``result`` are split so that every rank
    works on a step at the same time."""

    def __init__(self, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kwargs), daemon=True,
                                name=f"sim-rank-{kwargs['instance_id']}")
        self.proc.start()
        child.close()

    def ready(self) -> None:
        self._receive()

    def send_step(self, meta: StepMetadata, verify: list[Span], forward: list[Span], finished: set[str],
                  idle: bool) -> None:
        self._conn.send((meta, verify, forward, finished, idle))

    def result(self) -> StepResult:
        return self._receive()

    def close(self) -> TransferStats:
        self._conn.send(None)
        transfers = self._receive()
        self.proc.join(10)
        return transfers

    def _receive(self) -> Any:
        if not self._conn.poll(120):
            raise RuntimeError(f"{self.proc.name} did not answer within 120 s")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.proc.name} failed:\n{value}")
        return value
