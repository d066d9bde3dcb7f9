"""Describing vLLM's per-layer KV tensors as a PageLayout (see lmcache/page_layout.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from lmcache.page_layout import DTYPE_BYTES, LayerPages, LayoutError, PageLayout


def describe(tensors: Sequence[Any], kv_split: str | None = None) -> tuple[PageLayout, list[Any]]:
    """The PageLayout of vLLM's per-layer KV tensors, and their distinct storages in index order.

    ``kv_split`` says how a 5-D tensor splits K and V: "outer" ([2, blocks, ...], flash-attn) or
    "block" ([blocks, 2, ...], flashinfer); by default it is told from the shape.
    """
    if not tensors:
        raise LayoutError("no KV cache tensors were given")
    storages: list[Any] = []
    storage_index: dict[int, int] = {}
    layers: list[LayerPages] = []
    formats: set[tuple] = set()
    for i, t in enumerate(tensors):
        fmt, layer = _describe_layer(i, t, kv_split)
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in storage_index:
            storage_index[key] = len(storages)
            storages.append(storage)
        layers.append(
            msgspec.structs.replace(layer, storage=storage_index[key], offset=layer.offset + t.data_ptr() - key)
        )
        formats.add(fmt)
    if len(formats) != 1:
        raise LayoutError(f"layers differ in shape, dtype or layout: {sorted(formats)}")
    num_blocks, block_size, parts, page_bytes, dtype, heads, head_size, inner = formats.pop()
    layout = PageLayout(
        num_blocks=num_blocks,
        block_size=block_size,
        parts=parts,
        page_bytes=page_bytes,
        dtype=dtype,
        kv_heads=heads,
        head_size=head_size,
        inner=inner,
        storage_bytes=[s.nbytes() for s in storages],
        layers=layers,
    )
    layout.validate()
    return layout, storages


def _describe_layer(i: int, t: Any, kv_split: str | None) -> tuple[tuple, LayerPages]:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise LayoutError(f"layer {i}: unsupported dtype {dtype} (supported: {', '.join(DTYPE_BYTES)})")
    item = t.element_size()
    shape, stride = tuple(t.shape), tuple(t.stride())
    # names of the dims; B = block, K = the K/V split, N = tokens, H = heads, C = channels
    if len(shape) == 4:
        names, block_dim, part_dim = "BHNC", 0, None
    elif len(shape) == 3:
        names, block_dim, part_dim = "BNC", 0, None
    elif len(shape) == 5:
        split = kv_split or ("outer" if shape[0] == 2 and shape[1] != 2 else "block" if shape[1] == 2 else None)
        if split == "outer":
            names, block_dim, part_dim = "KBNHC", 1, 0
        elif split == "block":
            names, block_dim, part_dim = "BKNHC", 0, None  # K and V of a block form one page
        else:
            raise LayoutError(f"layer {i}: a 5-D KV tensor of shape {shape} has no dim of size 2 for K/V")
    else:
        raise LayoutError(f"layer {i}: KV tensors are 3-D, 4-D or 5-D (got shape {shape})")
    inner_dims = [d for d in range(len(shape)) if d not in (block_dim, part_dim)]
    page_elems = _dense_extent(i, [shape[d] for d in inner_dims], [stride[d] for d in inner_dims])
    # the order inside a page: inner dims by decreasing stride (size-1 dims sort last)
    inner = "".join(names[d] for d in sorted(inner_dims, key=lambda d: (-stride[d] if shape[d] > 1 else 0, d)))
    heads = shape[names.index("H")] if "H" in names else 1
    fmt = (
        shape[block_dim],
        shape[names.index("N")],
        2 if part_dim is not None else 1,
        page_elems * item,
        dtype,
        heads,
        shape[-1],
        inner,
    )
    part_stride = stride[part_dim] * item if part_dim is not None else 0
    return fmt, LayerPages(storage=0, offset=0, block_stride=stride[block_dim] * item, part_stride=part_stride)


def _dense_extent(i: int, sizes: list[int], strides: list[int]) -> int:
    """Elements of a page; raises unless the page's dims pack densely (one contiguous run)."""
    expected = 1
    for size, stride in sorted(zip(sizes, strides, strict=True), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            raise LayoutError(f"layer {i}: a block's elements are not one contiguous page (strides {strides})")
        expected *= size
    return expected
