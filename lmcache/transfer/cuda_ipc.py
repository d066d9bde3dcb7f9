"""CUDA IPC: how an engine hands its GPU KV cache to the server, and how the server finds it.

The engine exports each distinct storage of its KV tensors as a CUDA IPC memory handle (which
names the whole allocation holding it), the storage's offset in that allocation and its size,
together with the UUID of the device it lives on. The server opens the handles on the device
with that UUID: device indexes differ between containers and CUDA_VISIBLE_DEVICES settings,
UUIDs do not.

Ordering uses interprocess CUDA events: the engine sends the handle of an event it recorded after
its forward pass; the server's stream waits on it before copying, and records one of its own
events (handed to the engine at registration) after the copy.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Sequence
from typing import Any

from lmcache.protocol import CudaIpcStorage

HANDLE_BYTES = 64  # cudaIpcMemHandle_t and cudaIpcEventHandle_t
_UUID = re.compile(r"^[0-9a-f]{32}$")


class IpcError(ValueError):
    """A CUDA IPC description the server cannot use; the message says why."""


def normalize_uuid(value: Any) -> str:
    """A device UUID as 32 lowercase hex digits, from any of the spellings CUDA tools use
    ("GPU-xxxxxxxx-xxxx-...", a bare UUID, 16 raw bytes, uuid.UUID, torch's _CUuuid)."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 16:
            raise IpcError(f"a device UUID is 16 bytes, got {len(value)}")
        return bytes(value).hex()
    if isinstance(value, uuidlib.UUID):
        return value.hex
    text = str(value).strip().lower()
    text = text.removeprefix("gpu-").replace("-", "")
    if not _UUID.match(text):
        raise IpcError(f"not a device UUID: {str(value)!r}")
    return text


def validate(storages: Sequence[CudaIpcStorage], storage_bytes: Sequence[int]) -> str:
    """Checks the exported storages against the layout's; returns their device's UUID."""
    if len(storages) != len(storage_bytes):
        raise IpcError(f"the layout has {len(storage_bytes)} storages but {len(storages)} IPC handles were sent")
    devices = set()
    for i, (s, size) in enumerate(zip(storages, storage_bytes, strict=True)):
        if len(s.handle) != HANDLE_BYTES:
            raise IpcError(f"storage {i}: an IPC handle is {HANDLE_BYTES} bytes, got {len(s.handle)}")
        if not any(s.handle):
            raise IpcError(f"storage {i}: the IPC handle is all zeros")
        if s.offset < 0:
            raise IpcError(f"storage {i}: offset must be >= 0 (got {s.offset})")
        if s.nbytes != size:
            raise IpcError(f"storage {i}: the handle covers {s.nbytes} bytes, the layout needs {size}")
        devices.add(normalize_uuid(s.device_uuid))
    if len(devices) != 1:
        raise IpcError(f"the storages of one registration must be on one device, got {len(devices)}")
    return devices.pop()


def validate_event(handle: bytes) -> None:
    if handle and len(handle) != HANDLE_BYTES:
        raise IpcError(f"an IPC event handle is {HANDLE_BYTES} bytes, got {len(handle)}")


# --- the engine's side (torch) ------------------------------------------------------------------


def export_storages(storages: Sequence[Any]) -> list[CudaIpcStorage]:
    """IPC descriptions of torch CUDA storages (what vLLM's KV tensors live in)."""
    import torch

    exported = []
    for storage in storages:
        # torch's own sharing call: (device, handle, size, offset in the allocation, ...)
        device, handle, nbytes, offset = storage._share_cuda_()[:4]
        uuid = normalize_uuid(torch.cuda.get_device_properties(device).uuid)
        exported.append(CudaIpcStorage(uuid, _raw_handle(bytes(handle)), int(offset), int(nbytes)))
    return exported


def _raw_handle(handle: bytes) -> bytes:
    """The cudaIpcMemHandle_t inside torch's shareable handle. Recent torch prefixes it with a
    version byte and a kind byte: b"c" for cudaMalloc memory, b"e" for expandable segments,
    which are not shared through cudaIpcMemHandle and so cannot be opened by the server."""
    if len(handle) == HANDLE_BYTES:
        return handle  # older torch: the bare handle
    if len(handle) == HANDLE_BYTES + 2 and handle[1:2] == b"c":
        return handle[2:]
    if len(handle) > 1 and handle[1:2] == b"e":
        raise IpcError("the KV cache lives in expandable segments, which CUDA IPC handles cannot share; "
                       "start vLLM with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False")
    raise IpcError(f"unrecognised torch IPC handle ({len(handle)} bytes)")
