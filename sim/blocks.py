"""The engine's KV block pool, with vLLM's optional local prefix cache.

Without prefix caching (vLLM's ``--no-enable-prefix-caching``, the simulator's default) a freed
block is just free, and every reused token must come from the server. With it, a full prompt
block keeps its content when its request finishes and is found again by the chained hash of
the tokens up to its end, until the pool needs the block for something else (oldest freed
first, as vLLM does).
"""

from __future__ import annotations

from collections import OrderedDict


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """One hash per full block, each covering the whole prefix up to the end of its block."""
    hashes, parent = [], 0
    for i in range(len(tokens) // block_size):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, prefix_caching: bool) -> None:
        assert num_blocks >= 2
        self.prefix_caching = prefix_caching
        # Block 0 plays vLLM's null block and is never handed out.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash, for cached blocks
        self._block_of: dict[int, int] = {}  # hash -> block

    @property
    def capacity(self) -> int:
        return len(self._refs) - 1

    def num_free(self) -> int:
        return len(self._free)

    def cached_prefix(self, hashes: list[int]) -> list[int]:
        """The blocks that already hold the leading ``hashes`` (not taken yet)."""
        found = []
        if self.prefix_caching:
            for h in hashes:
                block = self._block_of.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def allocate(self, cached: list[int], n_new: int) -> list[int] | None:
        """Takes the ``cached`` blocks and ``n_new`` fresh ones, or nothing if they do not fit."""
        reusable_free = sum(1 for b in cached if self._refs[b] == 0)
        if len(self._free) - reusable_free < n_new:
            return None
        for b in cached:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
        fresh = []
        for _ in range(n_new):
            b, _ = self._free.popitem(last=False)
            self._forget(b)
            self._refs[b] = 1
            fresh.append(b)
        return cached + fresh

    def cache(self, blocks: list[int], hashes: list[int]) -> None:
        """Records that ``blocks`` now hold the KV of ``hashes`` (full, computed blocks)."""
        if not self.prefix_caching:
            return
        for b, h in zip(blocks, hashes, strict=False):
            if h not in self._block_of and b not in self._hash_of:
                self._block_of[h] = b
                self._hash_of[b] = h

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if not self.prefix_caching:
                    self._forget(b)
                self._free[b] = None

    def _forget(self, b: int) -> None:
        h = self._hash_of.pop(b, None)
        if h is not None:
            del self._block_of[h]
