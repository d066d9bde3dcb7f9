"""A GPU engine's registered KV cache: page copies between its blocks (opened over CUDA IPC) and
chunk objects in the pinned L1 arena, queued on the server's own CUDA stream.

Two ways to cross PCIe, chosen per registration (``strategy``):
- ``staging``: the kernel packs a request's pages into a device buffer, then one DMA copy per
  chunk object moves them to or from pinned L1;
- ``mapped``: the kernel reads or writes pinned L1 directly through its device mapping.
scripts/gpu_check.sh measures both; ``staging`` is the default.

Nothing here waits on the host. A call queues: a wait for the engine's event, the copies, and a
record of one of the server's interprocess events; it returns that event's index (the engine
polls it) and a marker the server waits on, off the request path, before it publishes or
releases the chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmcache.transfer.layouts import PageLayout
from lmcache.transfer.registered import PagePlan

STRATEGIES = ("staging", "mapped")


class GpuCache(PagePlan):
    def __init__(
        self, layout: PageLayout, storages: Sequence[Any], chunk_size: int, runtime: Any,
        strategy: str = "staging", opened: Sequence[int] = (),
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
        # One request's queued work must not interleave with another's: they share the staging buffer.
        self._lock = threading.Lock()

    def _plan(self, blocks: np.ndarray, object_offsets: Sequence[int], skip_blocks: int = 0):
        """Per storage group: (storage page offsets, object page offsets relative to each
        object's start, the object index of each page), skipping the first ``skip_blocks``."""
        n = blocks.shape[0]
        parts = self.layout.parts
        ppc = self.blocks_per_chunk * parts
        pages = self.layout.page_offsets(blocks.ravel()).reshape(self.layout.num_layers, n, ppc)
        keep = np.arange(n * ppc).reshape(n, ppc) >= skip_blocks * parts
        chunk_of = np.broadcast_to(np.arange(n)[:, None], (n, ppc))
        for storage, rows in self._groups:
            mask = np.broadcast_to(keep, (len(rows), n, ppc))
            obj = np.broadcast_to(self._object_pages[rows][:, None, :], (len(rows), n, ppc))
            owner = np.broadcast_to(chunk_of, (len(rows), n, ppc))
            yield storage, pages[rows][mask], obj[mask], owner[mask]

    def _staging_buffer(self, nbytes: int) -> Any:
        if self._staging is None or self._staging.shape[0] < nbytes:
            self._staging = self.runtime.staging(max(nbytes, self.object_bytes))
        return self._staging

    def gather(self, blocks: np.ndarray, object_offsets: Sequence[int], wait_event: bytes = b"") -> tuple[int, Any]:
        """Queues the copy of each chunk's ``blocks`` into the object at ``object_offsets[i]``."""
        rt = self.runtime
        offsets = np.asarray(object_offsets, dtype=np.int64)
        page = self.layout.page_bytes
        with self._lock:
            rt.wait_for(wait_event)
            if self.strategy == "mapped":
                arena = rt.arena()
                for storage, src, obj, owner in self._plan(blocks, offsets):
                    rt.copy_pages(self.storages[storage], src, arena, obj + offsets[owner], page)
            else:
                staging = self._staging_buffer(len(offsets) * self.object_bytes)
                for storage, src, obj, owner in self._plan(blocks, offsets):
                    rt.copy_pages(self.storages[storage], src, staging, obj + owner * self.object_bytes, page)
                arena = rt.arena()
                for i, offset in enumerate(offsets):
                    rt.copy(arena, int(offset), staging, i * self.object_bytes, self.object_bytes)
            return rt.mark()

    def scatter(
        self, object_offsets: Sequence[int], blocks: np.ndarray, skip_blocks: int = 0, wait_event: bytes = b""
    ) -> tuple[int, Any]:
        """Queues the copy of each object into its chunk's ``blocks``, except the first
        ``skip_blocks`` blocks of the request (the engine holds them already)."""
        rt = self.runtime
        offsets = np.asarray(object_offsets, dtype=np.int64)
        page = self.layout.page_bytes
        with self._lock:
            rt.wait_for(wait_event)
            if self.strategy == "mapped":
                arena = rt.arena()
                for storage, dst, obj, owner in self._plan(blocks, offsets, skip_blocks):
                    rt.copy_pages(arena, obj + offsets[owner], self.storages[storage], dst, page)
            else:
                staging = self._staging_buffer(len(offsets) * self.object_bytes)
                arena = rt.arena()
                for i, offset in enumerate(offsets):
                    rt.copy(staging, i * self.object_bytes, arena, int(offset), self.object_bytes)
                for storage, dst, obj, owner in self._plan(blocks, offsets, skip_blocks):
                    rt.copy_pages(staging, obj + owner * self.object_bytes, self.storages[storage], dst, page)
            return rt.mark()

    def close(self) -> None:
        self.runtime.close_storages(self._opened)
        self._opened = []
