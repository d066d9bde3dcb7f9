"""A registered KV cache: its page layout over its storages, and the page copies between its
blocks and chunk objects in the L1 arena. Moves bytes; decides nothing. The server uses it over
mapped engine segments (engine_driven); an engine uses it over its own tensors (lmcache_driven)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmcache._fast.kernels import copy_pages
from lmcache.page_layout import PageLayout


def storage_array(storage) -> np.ndarray:
    """A torch storage's bytes as a writable numpy uint8 array (no copy)."""
    import torch

    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


class PagePlan:
    """Where a chunk's pages are: in the engine's storages (by block id) and inside a chunk object."""

    def __init__(self, layout: PageLayout, chunk_size: int) -> None:
        layout.validate()
        self.layout = layout
        self.blocks_per_chunk = layout.blocks_per_chunk(chunk_size)
        self.object_bytes = layout.object_bytes(chunk_size)
        # Layers grouped by storage: one kernel call per storage per chunk (one in vLLM 0.33).
        by_storage: dict[int, list[int]] = {}
        for i, layer in enumerate(layout.layers):
            by_storage.setdefault(layer.storage, []).append(i)
        self._groups = [(s, np.array(rows, dtype=np.int64)) for s, rows in by_storage.items()]
        pages_per_layer = self.blocks_per_chunk * layout.parts
        # Where each (layer, block, part) page sits inside a chunk object.
        self._object_pages = (
            np.arange(layout.num_layers * pages_per_layer, dtype=np.int64).reshape(layout.num_layers, -1)
            * layout.page_bytes
        )

    def check_blocks(self, n_chunks: int, block_ids: Sequence[int]) -> np.ndarray:
        """The block ids as an array of shape (n_chunks, blocks_per_chunk); raises ValueError."""
        blocks = np.asarray(block_ids, dtype=np.int64)
        if blocks.ndim != 1 or blocks.size != n_chunks * self.blocks_per_chunk:
            raise ValueError(
                f"{n_chunks} chunk(s) need {n_chunks * self.blocks_per_chunk} block ids "
                f"({self.blocks_per_chunk} per chunk), got {blocks.size}"
            )
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.layout.num_blocks):
            raise ValueError(f"block ids must lie in [0, {self.layout.num_blocks})")
        return blocks.reshape(n_chunks, self.blocks_per_chunk)


class RegisteredCache(PagePlan):
    def __init__(self, layout: PageLayout, storages: Sequence[np.ndarray], chunk_size: int) -> None:
        super().__init__(layout, chunk_size)
        if len(storages) != len(layout.storage_bytes):
            raise ValueError(f"the layout has {len(layout.storage_bytes)} storages, {len(storages)} were mapped")
        self.storages = list(storages)
        # Load (or compile) the kernel now, at registration, rather than in the first store.
        none = np.zeros(0, dtype=np.int64)
        copy_pages(self.storages[0], none, self.storages[0], none, layout.page_bytes)

    def gather(self, blocks: np.ndarray, arena: np.ndarray, object_offset: int) -> None:
        """Copies the pages of one chunk's ``blocks`` into the object at ``object_offset``."""
        pages = self.layout.page_offsets(blocks)
        for storage, rows in self._groups:
            copy_pages(
                self.storages[storage], pages[rows].ravel(), arena,
                (self._object_pages[rows] + object_offset).ravel(), self.layout.page_bytes,
            )

    def scatter(self, arena: np.ndarray, object_offset: int, blocks: np.ndarray, skip_blocks: int = 0) -> None:
        """Copies one chunk object into the pages of ``blocks``, except its first ``skip_blocks``."""
        first = min(skip_blocks, blocks.size) * self.layout.parts
        pages = self.layout.page_offsets(blocks)[:, first:]
        for storage, rows in self._groups:
            copy_pages(
                arena, (self._object_pages[rows, first:] + object_offset).ravel(),
                self.storages[storage], pages[rows].ravel(), self.layout.page_bytes,
            )
