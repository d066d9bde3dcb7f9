"""One simulated vLLM engine: a scheduler with the connector's SchedulerAdapter, a block pool,
and one ``WorkerProcess`` per tensor-parallel rank.

Each step follows vLLM's scheduler: admit waiting requests in arrival order while there is room
(``max_num_seqs`` running, free blocks), asking the adapter how many tokens the server holds
(a request whose lookup is not answered yet waits for a later step); requests with a hit wait
for their load; the others share the step's token budget (chunked prefill, then one token per
step of decode). Every rank runs the step; a load or a store counts as finished once every rank
reports it, and a finished request's blocks go back to the pool only when its stores are done.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lmcache import protocol as p
from lmcache.client import MPClient, ReplyFuture
from lmcache.config import ConnectorConfig, strip_scheme
from lmcache.integration.vllm.adapter import SchedulerAdapter
from lmcache.kv_transfer import TransferStats
from sim.blocks import BlockPool, block_hashes
from sim.model import ModelSpec
from sim.worker import Mismatch, Span, StepResult, WorkerProcess
from sim.workloads import VOCAB


@dataclass
class Stats:
    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0  # loaded from the server
    local_hit_tokens: int = 0  # found in the engine's own prefix cache
    truncated: int = 0
    steps: int = 0
    max_batch: int = 0  # most requests computed in one step
    lookup_ms: list[float] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)


@dataclass
class _Req:
    req_id: str
    tokens: list[int]  # the prompt, then the tokens generated so far
    prompt_len: int
    output_len: int
    block_hashes: list[int]
    blocks: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> loading (only with a hit) -> running -> freeing
    computed: int = 0  # tokens whose KV is in the blocks
    local: int = 0
    external: int = 0
    verified: bool = False
    generated: int = 0
    recv_ranks: set[int] = field(default_factory=set)
    send_ranks: set[int] = field(default_factory=set)


class _LookupTimes:
    """Notes, as the scheduler adapter's client sends them, when each Lookup was sent and answered."""

    def __init__(self) -> None:
        self.pending: dict[str, ReplyFuture] = {}

    def observe(self, request: p.Request, future: ReplyFuture) -> None:
        if isinstance(request, p.Lookup):
            self.pending[request.session] = future

    def answered_ms(self) -> list[float]:
        done = []
        for session, future in list(self.pending.items()):
            if future.done():
                del self.pending[session]
                done.append((future.done_at - future.sent_at) * 1000)
        return done


class SimEngine:
    def __init__(
        self, spec: ModelSpec, config: ConnectorConfig, ranks: int, chunk_size: int, instance: str,
        max_num_seqs: int, max_num_batched_tokens: int, prefix_caching: bool, max_output_tokens: int,
    ) -> None:
        self.spec, self.ranks, self.chunk_size = spec, ranks, chunk_size
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.max_output_tokens = max_output_tokens
        self.workers: list[WorkerProcess] = []
        try:
            for r in range(ranks):
                self.workers.append(WorkerProcess(spec=spec, config=config, rank=r, world_size=ranks,
                                                  instance_id=f"{instance}-rank{r}", chunk_size=chunk_size))
            for w in self.workers:
                w.ready()
        except BaseException:  # a Ctrl-C or a rank that failed to start: nobody else knows these ranks yet
            self.kill()
            raise
        self.lookups = _LookupTimes()
        self.client = MPClient(strip_scheme(config.host), config.port, timeout_s=config.timeout_s,
                               observe=self.lookups.observe)
        self.scheduler = SchedulerAdapter(config, spec.name, ranks, spec.block_size, client=self.client)
        self.pool = BlockPool(spec.num_blocks, prefix_caching)
        self.waiting: deque[_Req] = deque()
        self.active: dict[str, _Req] = {}  # loading and running, in admission order
        self.freeing: dict[str, _Req] = {}
        self._finished: set[str] = set()
        self._load_errors: set[int] = set()
        self._scheduled: list[tuple[_Req, int]] = []
        self.stats = Stats()

    # --- arrivals ----------------------------------------------------------------------------

    def add(self, req_id: str, tokens: list[int], output_len: int) -> None:
        bs = self.spec.block_size
        output_len = min(output_len, self.max_output_tokens)  # its blocks are taken up front: no preemption
        limit = (self.pool.capacity - 2) * bs
        if len(tokens) > limit:
            tokens = tokens[:limit]
            self.stats.truncated += 1
        self.stats.requests += 1
        self.stats.prompt_tokens += len(tokens)
        hashes = block_hashes(tokens, bs) if self.pool.prefix_caching else []
        self.waiting.append(_Req(req_id, list(tokens), len(tokens), output_len, hashes))
        self.scheduler.on_new_request(req_id, tokens)

    def busy(self) -> bool:
        return bool(self.waiting or self.active or self.freeing)

    # --- one step, split so that several engines' workers run at once ------------------------

    def begin_step(self) -> None:
        self._admit()
        budget = self.max_tokens
        scheduled: list[tuple[_Req, int]] = []
        verify: list[Span] = []
        forward: list[Span] = []
        for req in self.active.values():
            if req.state != "running" or budget <= 0:
                continue
            n = min(req.prompt_len - req.computed, budget) if req.computed < req.prompt_len else 1
            budget -= n
            scheduled.append((req, n))
            if not req.verified:  # what came from the server or the local cache, before it is used
                req.verified = True
                if req.computed:
                    verify.append(Span(req.req_id, req.blocks, 0, req.tokens[: req.computed]))
            forward.append(Span(req.req_id, req.blocks, req.computed, req.tokens[req.computed : req.computed + n]))
        meta = self.scheduler.build_step([(r.req_id, r.blocks, True, r.computed, n) for r, n in scheduled],
                                         self._finished, set())
        finished, self._finished = self._finished, set()
        for w in self.workers:
            w.send_step(meta, verify, forward, finished, not scheduled)
        self._scheduled = scheduled
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, len(scheduled))

    def end_step(self) -> list[str]:
        """Collects the ranks' results; returns the requests that finished in this step."""
        results: list[StepResult] = [w.result() for w in self.workers]
        recv_done, send_done = set(), set()
        for rank, res in enumerate(results):
            self.stats.mismatches.extend(res.mismatches)
            self._load_errors |= res.load_errors
            recv_done |= self._every_rank(res.finished_recving, self.active, "recv_ranks", rank)
            send_done |= self._every_rank(res.finished_sending, self.freeing, "send_ranks", rank)
        self.scheduler.update_connector_output(send_done, recv_done)
        for req_id in recv_done:
            self._loaded(self.active[req_id])
        for req_id in send_done:
            self.pool.free(self.freeing.pop(req_id).blocks)
        done = []
        for req, n in self._scheduled:
            if self._computed(req, n):
                done.append(req.req_id)
        self._scheduled = []
        self.stats.lookup_ms.extend(self.lookups.answered_ms())
        return done

    # --- the scheduler's bookkeeping ---------------------------------------------------------

    def _every_rank(self, reported: set[str], requests: dict[str, _Req], ranks: str, rank: int) -> set[str]:
        """The requests ``rank`` reported that every rank has now reported (as vLLM counts them)."""
        done = set()
        for req_id in reported:
            req = requests.get(req_id)
            if req is not None:
                seen = getattr(req, ranks)
                seen.add(rank)
                if len(seen) == self.ranks:
                    done.add(req_id)
        return done

    def _admit(self) -> None:
        bs = self.spec.block_size
        skipped: list[_Req] = []
        while self.waiting and len(self.active) < self.max_num_seqs:
            req = self.waiting.popleft()
            cached = self.pool.cached_prefix(req.block_hashes[: (req.prompt_len - 1) // bs])
            local = len(cached) * bs
            external, _ = self.scheduler.get_num_new_matched_tokens(req.req_id, local)
            if external is None:  # the server has not answered yet: ask again next step
                skipped.append(req)
                continue
            need = math.ceil((req.prompt_len + req.output_len) / bs) - len(cached)
            blocks = self.pool.allocate(cached, need)
            if blocks is None:
                self.waiting.appendleft(req)
                break
            req.blocks, req.local, req.computed, req.external = blocks, local, local, external
            self.stats.local_hit_tokens += local
            self.scheduler.update_state_after_alloc(req.req_id, blocks, external, local)
            req.state = "loading" if external else "running"
            self.active[req.req_id] = req
        self.waiting.extendleft(reversed(skipped))

    def _loaded(self, req: _Req) -> None:
        """Every rank has finished this request's load: it computes from the first block that
        any rank failed to load (vLLM recomputes those)."""
        bs = self.spec.block_size
        end = req.local + req.external
        failed = [i for i, b in enumerate(req.blocks) if b in self._load_errors]
        self._load_errors.difference_update(req.blocks)
        if failed:
            end = max(req.local, min(end, failed[0] * bs))
        req.computed = end
        self.stats.hit_tokens += end - req.local
        req.state = "running"

    def _computed(self, req: _Req, n: int) -> bool:
        """The step computed ``n`` more tokens of ``req``; True if that finished the request."""
        bs = self.spec.block_size
        req.computed += n
        if req.computed < req.prompt_len:
            return False
        if req.computed == req.prompt_len:
            full = req.prompt_len // bs
            self.pool.cache(req.blocks[:full], req.block_hashes[:full])
        if req.generated < req.output_len:
            token = (req.tokens[-1] * 7919 + len(req.tokens)) % (VOCAB - 1) + 1
            req.tokens.append(token)
            req.generated += 1
            self.scheduler.append_tokens(req.req_id, [token])
            if req.generated < req.output_len:
                return False
        del self.active[req.req_id]
        self._finished.add(req.req_id)
        if self.scheduler.request_finished(req.req_id):
            req.state = "freeing"
            self.freeing[req.req_id] = req
        else:
            self.pool.free(req.blocks)
        return True

    def close(self) -> list[TransferStats]:
        transfers = [w.close() for w in self.workers]
        self.scheduler.close()
        return transfers

    def stop(self, deadline: float, abandon: Callable[[], bool]) -> list[TransferStats | None]:
        """After an interrupt: closes every rank by ``deadline`` (see WorkerProcess.stop); None
        for a rank that had to be killed before it said what it moved."""
        transfers = [w.stop(deadline, abandon) for w in self.workers]
        self.scheduler.close()
        return transfers

    def kill(self) -> None:
        """Ends whatever ranks still run and removes what they left in /dev/shm (a no-op after close)."""
        for w in self.workers:
            w.kill()
