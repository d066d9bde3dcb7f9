"""A GPU engine's registered KV cache: page copies between its blocks (opened over CUDA IPC) and
chunk objects in the pinned L1 arena, queued on the server's own CUDA stream.

Two ways to cross PCIe, chosen per server (``--gpu-copy``):
- ``staging``: the kernel packs up to STAGING_CHUNKS chunks' pages into a device buffer, then
  one DMA copy per chunk object moves them to or from pinned L1 (the buffer is reused in
  stream order, so it stays small on a GPU vLLM has filled);
- ``mapped``: the kernel reads or writes pinned L1 directly through its device mapping.
scripts/gpu_bench.py measures both; ``staging`` is the default.

Nothing here waits on the host. A call uploads its page offsets, makes the stream wait for the
engine's event, queues the copies and records one of the server's interprocess events; it
returns that event's index (the engine polls it) and a marker the server waits on, off the
request path, before it publishes or releases the chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lmcache._fast.kernels import cuda_word
from lmcache.page_layout import PageLayout
from lmcache.transfer.cuda_runtime import GpuRuntime
from lmcache.transfer.registered import PagePlan

STRATEGIES = ("staging", "mapped")
STAGING_CHUNKS = 4


class GpuCacheClosed(RuntimeError):
    """The registration was dropped; its IPC mappings are being closed."""


class GpuCache(PagePlan):
    def __init__(
        self, layout: PageLayout, storages: Sequence[Any], chunk_size: int, runtime: GpuRuntime,
        strategy: str = "staging", opened: Sequence[Any] = (),
    ) -> None:
        super().__init__(layout, chunk_size)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown GPU copy strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
        if len(storages) != len(layout.storage_bytes):
            raise ValueError(f"the layout has {len(layout.storage_bytes)} storages, {len(storages)} were opened")
        self.storages = list(storages)
        self.runtime = runtime
        self.strategy = strategy
        self._opened = list(opened)
        self._staging: Any = None
        self._closed = False
        self.events: set[bytes] = set()  # the engine's event handles seen, closed with the cache
        # One request's queued work must not interleave with another's (the staging buffer).
        self._lock = threading.Lock()

    def _plan(self, blocks: np.ndarray, skip_blocks: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Per storage group: (storage page offsets, object page offsets relative to each
        object's start, the chunk index of each page), skipping the first ``skip_blocks``."""
        n = blocks.shape[0]
        ppc = self.blocks_per_chunk * self.layout.parts
        pages = self.layout.page_offsets(blocks.ravel()).reshape(self.layout.num_layers, n, ppc)
        keep = np.arange(n * ppc).reshape(n, ppc) >= skip_blocks * self.layout.parts
        chunk_of = np.broadcast_to(np.arange(n)[:, None], (n, ppc))
        for storage, rows in self._groups:
            mask = np.broadcast_to(keep, (len(rows), n, ppc))
            obj = np.broadcast_to(self._object_pages[rows][:, None, :], (len(rows), n, ppc))
            owner = np.broadcast_to(chunk_of, (len(rows), n, ppc))
            yield storage, pages[rows][mask], obj[mask], owner[mask]

    def _jobs(self, src_side: str, blocks: np.ndarray, obj_base: np.ndarray, skip_blocks: int, obj_buffer: Any):
        """Uploaded page copies between the storages and ``obj_buffer`` (objects at ``obj_base``)."""
        rt, page = self.runtime, self.layout.page_bytes
        jobs = []
        for storage, pages, obj, owner in self._plan(blocks, skip_blocks):
            if not pages.size:
                continue
            obj_offsets = obj + obj_base[owner]
            kv = self.storages[storage]
            src, src_off, dst, dst_off = (
                (kv, pages, obj_buffer, obj_offsets) if src_side == "kv" else (obj_buffer, obj_offsets, kv, pages)
            )
            word = cuda_word(src.shape[0], dst.shape[0], page, src_off, dst_off)
            jobs.append((src, rt.upload(src_off // word), dst, rt.upload(dst_off // word), src_off.size, word))
        return jobs

    def _run(self, jobs: list) -> None:
        for src, src_words, dst, dst_words, n, word in jobs:
            self.runtime.launch_pages(src, src_words, dst, dst_words, n, self.layout.page_bytes, word)

    def _staging_buffer(self) -> Any:
        if self._staging is None:
            self._staging = self.runtime.staging(STAGING_CHUNKS * self.object_bytes)
        return self._staging

    def gather(self, blocks: np.ndarray, object_offsets: Sequence[int], wait_event: bytes = b"") -> tuple[int, Any]:
        """Queues the copy of each chunk's ``blocks`` into the object at ``object_offsets[i]``."""
        rt = self.runtime
        offsets = np.asarray(object_offsets, dtype=np.int64)
        with self._lock:
            self._check_open(wait_event)
            arena = rt.arena()
            if self.strategy == "mapped":
                jobs = [self._jobs("kv", blocks, offsets, 0, arena)]
            else:
                staging = self._staging_buffer()
                slots = np.arange(STAGING_CHUNKS, dtype=np.int64) * self.object_bytes
                jobs = [self._jobs("kv", blocks[i : i + STAGING_CHUNKS], slots, 0, staging)
                        for i in range(0, len(offsets), STAGING_CHUNKS)]
            rt.wait_for(wait_event)
            for g, group in enumerate(jobs):
                self._run(group)
                if self.strategy == "staging":
                    first = g * STAGING_CHUNKS
                    for j, offset in enumerate(offsets[first : first + STAGING_CHUNKS]):
                        rt.copy(arena, int(offset), staging, j * self.object_bytes, self.object_bytes)
            return rt.mark()

    def scatter(
        self, object_offsets: Sequence[int], blocks: np.ndarray, skip_blocks: int = 0, wait_event: bytes = b""
    ) -> tuple[int, Any]:
        """Queues the copy of each object into its chunk's ``blocks``, except the first
        ``skip_blocks`` blocks of the request (the engine holds them already)."""
        rt = self.runtime
        offsets = np.asarray(object_offsets, dtype=np.int64)
        bpc = self.blocks_per_chunk
        with self._lock:
            self._check_open(wait_event)
            arena = rt.arena()
            if self.strategy == "mapped":
                jobs = [self._jobs("obj", blocks, offsets, skip_blocks, arena)]
            else:
                staging = self._staging_buffer()
                slots = np.arange(STAGING_CHUNKS, dtype=np.int64) * self.object_bytes
                jobs = [self._jobs("obj", blocks[i : i + STAGING_CHUNKS], slots, max(0, skip_blocks - i * bpc), staging)
                        for i in range(0, len(offsets), STAGING_CHUNKS)]
            rt.wait_for(wait_event)
            for g, group in enumerate(jobs):
                if self.strategy == "staging":
                    first = g * STAGING_CHUNKS
                    for j, offset in enumerate(offsets[first : first + STAGING_CHUNKS]):
                        rt.copy(staging, j * self.object_bytes, arena, int(offset), self.object_bytes)
                self._run(group)
            return rt.mark()

    def _check_open(self, wait_event: bytes) -> None:
        if self._closed:
            raise GpuCacheClosed("the engine's registration was dropped")
        if wait_event:
            self.events.add(bytes(wait_event))

    def close(self, after: Any) -> None:
        """Closes the IPC mappings once every copy queued so far has run; later calls fail.
        ``after(runtime, marker, then)`` runs ``then`` once the marker is done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _, marker = self.runtime.mark()
        opened, events = self._opened, self.events

        def close_now(ok: bool) -> None:
            self.runtime.close_storages(opened)
            for event in events:
                self.runtime.forget_event(event)

        after(self.runtime, marker, close_now)
