"""A GPU runtime over host memory, for tests on machines without a device."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmcache._fast.kernels import cuda_launch_pages
from lmcache.protocol import CudaIpcStorage
from lmcache.transfer.cuda_ipc import HANDLE_BYTES, IpcError, normalize_uuid
from lmcache.transfer.cuda_runtime import SERVER_EVENTS


class SimulatedRuntime:
    """Host memory standing in for a device, for tests on machines without one.

    "IPC handles" are keys of ``exported`` (handle bytes -> the array behind it). Page copies run
    the CUDA kernel in Numba's simulator (``kernel="cuda"``, needs NUMBA_ENABLE_CUDASIM=1) or the
    CPU kernel (``kernel="cpu"``). With ``hold=True`` queued copies count as done only after
    ``release()``, so a test can look at the state while a copy is "in flight".
    """

    def __init__(
        self, arena: np.ndarray, device_uuid: str = "0" * 32, exported: dict[bytes, np.ndarray] | None = None,
        kernel: str = "cuda", hold: bool = False,
    ) -> None:
        self.uuid = normalize_uuid(device_uuid)
        self.device = 0
        self._arena: np.ndarray | None = arena
        self._exported = exported or {}
        self._kernel = kernel
        self._hold = hold
        self._markers: list[threading.Event] = []
        self.event_handles = [bytes([i + 1]) * HANDLE_BYTES for i in range(SERVER_EVENTS)]
        self._next_event = 0
        self.waited: list[bytes] = []
        self.closed: list[bytes] = []
        self.forgotten: list[bytes] = []

    def open_storages(self, storages: Sequence[CudaIpcStorage]) -> tuple[list[Any], list[bytes]]:
        arrays = []
        for s in storages:
            base = self._exported.get(bytes(s.handle))
            if base is None:
                raise IpcError("cannot open the engine's CUDA IPC handle: invalid handle")
            arrays.append(base[s.offset : s.offset + s.nbytes])
        return arrays, [bytes(s.handle) for s in storages]

    def close_storages(self, opened: Sequence[Any]) -> None:
        self.closed.extend(opened)

    def wait_for(self, event_handle: bytes) -> None:
        if event_handle:
            self.waited.append(event_handle)

    def forget_event(self, event_handle: bytes) -> None:
        self.forgotten.append(event_handle)

    def upload(self, array: np.ndarray) -> Any:
        return np.ascontiguousarray(array)

    def launch_pages(self, src: Any, src_words: Any, dst: Any, dst_words: Any, n_pages: int, page_bytes: int,
                     word: int) -> None:
        if self._kernel == "cpu":
            from lmcache._fast.kernels import copy_pages

            copy_pages(src, src_words * word, dst, dst_words * word, page_bytes)
        else:
            cuda_launch_pages(src, src_words, dst, dst_words, n_pages, page_bytes, word, threads=32)

    def copy(self, dst: Any, dst_offset: int, src: Any, src_offset: int, nbytes: int) -> None:
        dst[dst_offset : dst_offset + nbytes] = src[src_offset : src_offset + nbytes]

    def arena(self) -> Any:
        return self._arena

    def staging(self, nbytes: int) -> Any:
        return np.zeros(nbytes, dtype=np.uint8)

    def mark(self) -> tuple[int, Any]:
        index = self._next_event
        self._next_event = (index + 1) % SERVER_EVENTS
        marker = threading.Event()
        if self._hold:
            self._markers.append(marker)
        else:
            marker.set()
        return index, marker

    def release(self) -> None:
        """Lets every held copy complete."""
        for marker in self._markers:
            marker.set()
        self._markers.clear()

    def wait_marker(self, marker: Any, timeout: float | None = None) -> bool:
        return marker.wait(timeout)

    def synchronize(self) -> None:
        self.release()

    def close(self) -> None:
        self.release()
        self._arena = None  # the pool cannot close while a view of it lives
