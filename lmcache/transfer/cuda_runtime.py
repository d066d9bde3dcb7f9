"""The few CUDA operations the server's GPU path needs, behind one small interface.

``CupyRuntime`` is the real one: CuPy's runtime API for IPC memory and events, streams and
async copies, with our Numba kernels launched on the same stream. ``SimulatedRuntime`` runs the
same calls on host memory (kernels in Numba's CUDA simulator, or the CPU kernel), so the GPU
copy logic is tested byte for byte on machines without a GPU; it has no real concurrency.

One runtime serves one device. Its stream is the server's own: engine events are waited on
there, never on the host, so vLLM's forward pass is never stalled by the server. Nothing a
request thread does waits for the stream either: page offsets go up from pinned buffers, and
everything a queued copy still needs is kept alive until its marker has been waited on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from lmcache._fast.kernels import cuda_launch_pages
from lmcache.protocol import CudaIpcStorage
from lmcache.transfer.cuda_ipc import HANDLE_BYTES, IpcError, normalize_uuid

SERVER_EVENTS = 64  # interprocess events per device, recorded in turn after copies


def visible_devices() -> list[str]:
    """UUIDs of the GPUs this process sees, in CUDA's order; raises IpcError without CUDA."""
    try:
        from numba import cuda

        return [normalize_uuid(d.uuid) for d in cuda.list_devices()]
    except ImportError as e:
        raise IpcError(f"the server has no CUDA support installed (CuPy and numba-cuda): {e}") from e
    except Exception as e:  # noqa: BLE001 - no driver, no device: one clear error
        raise IpcError(f"the server cannot use CUDA: {e}") from e


class GpuRuntime(Protocol):
    """One device's CUDA runtime as the server uses it: CupyRuntime on hardware, a simulated one
    in tests (lmcache/testing/simulated_gpu.py). Markers are points on the server's stream."""

    @property
    def event_handles(self) -> Sequence[bytes]:  # the server's interprocess events, handed to engines
        ...


    def open_storages(self, storages: Sequence[CudaIpcStorage]) -> tuple[list[Any], list[Any]]: ...
    def close_storages(self, opened: Sequence[Any]) -> None: ...
    def wait_for(self, event_handle: bytes) -> None: ...
    def forget_event(self, event_handle: bytes) -> None: ...
    def upload(self, array: np.ndarray) -> Any: ...
    def launch_pages(self, src: Any, src_words: Any, dst: Any, dst_words: Any, n_pages: int, page_bytes: int,
                     word: int) -> None: ...
    def copy(self, dst: Any, dst_offset: int, src: Any, src_offset: int, nbytes: int) -> None: ...
    def arena(self) -> Any: ...
    def staging(self, nbytes: int) -> Any: ...
    def mark(self) -> tuple[int, Any]: ...
    def wait_marker(self, marker: Any, timeout: float | None = None) -> bool: ...
    def synchronize(self) -> None: ...
    def close(self) -> None: ...


class CupyRuntime:
    def __init__(self, device_uuid: str, arena: np.ndarray, pin: bool = True) -> None:
        """``pin``: page-lock the L1 arena (once per process: it is pinned for every device)."""
        try:
            import cupy
            from numba import cuda
        except ImportError as e:
            raise IpcError(f"the server has no CUDA support installed (CuPy and numba-cuda): {e}") from e
        self._cupy, self._cuda = cupy, cuda
        self.uuid = normalize_uuid(device_uuid)
        visible = visible_devices()
        if self.uuid not in visible:
            raise IpcError(f"the server cannot see the engine's GPU {self.uuid} (it sees: {', '.join(visible) or 'none'})")
        self.device = visible.index(self.uuid)
        rt = self._rt = cupy.cuda.runtime
        self._lock = threading.Lock()
        self._opened_events: dict[bytes, int] = {}
        self._opened: dict[bytes, tuple[int, int]] = {}  # IPC handle -> (pointer, users)
        self._keep: list[Any] = []  # what copies queued since the last mark still need
        self._arena_ptr = arena.ctypes.data
        self._pinned = False
        try:
            with cupy.cuda.Device(self.device):
                self._stream = cupy.cuda.Stream(non_blocking=True)
                self._numba_stream = cuda.external_stream(self._stream.ptr)
                flags = rt.eventDisableTiming | rt.eventInterprocess
                self._events = [rt.eventCreateWithFlags(flags) for _ in range(SERVER_EVENTS)]
                self.event_handles = [rt.ipcGetEventHandle(e) for e in self._events]
                self._next_event = 0
                if pin:  # page-locked L1: DMA at full speed, and kernels can reach it (mapped)
                    rt.hostRegister(self._arena_ptr, arena.nbytes, rt.hostAllocMapped | rt.hostAllocPortable)
                    self._pinned = True
                self._arena_dev = self._device_array(self._arena_ptr, arena.nbytes, owner=arena)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory, or pinning refused
            if self._pinned:
                try:
                    rt.hostUnregister(self._arena_ptr)
                except Exception:  # noqa: BLE001
                    pass
            raise IpcError(f"cannot set up GPU {self.uuid} on the server: {e}") from e

    def _device_array(self, ptr: int, nbytes: int, owner: Any) -> Any:
        cupy = self._cupy
        memory = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device_id=self.device)
        return cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))

    # -- IPC memory
    def open_storages(self, storages: Sequence[CudaIpcStorage]) -> tuple[list[Any], list[bytes]]:
        """Device arrays over the engine's storages, and the handles to close later.

        CUDA opens a handle once per context, so handles are shared and counted: storages in
        one allocation, or an engine registering again before its old registration closed."""
        arrays, opened = [], []
        with self._lock, self._cupy.cuda.Device(self.device):
            try:
                for s in storages:
                    handle = bytes(s.handle)
                    base, users = self._opened.get(handle, (0, 0))
                    if not users:
                        base = self._rt.ipcOpenMemHandle(handle)
                    self._opened[handle] = (base, users + 1)
                    opened.append(handle)
                    arrays.append(self._device_array(base + s.offset, s.nbytes, owner=None))
            except Exception as e:  # noqa: BLE001 - a stale or foreign handle
                self._close_locked(opened)
                raise IpcError(f"cannot open the engine's CUDA IPC handle: {e}") from e
        return arrays, opened

    def close_storages(self, opened: Sequence[bytes]) -> None:
        with self._lock, self._cupy.cuda.Device(self.device):
            self._close_locked(opened)

    def _close_locked(self, opened: Sequence[bytes]) -> None:
        for handle in opened:
            base, users = self._opened.get(handle, (0, 0))
            if users > 1:
                self._opened[handle] = (base, users - 1)
                continue
            self._opened.pop(handle, None)
            if users:
                try:
                    self._rt.ipcCloseMemHandle(base)
                except Exception:  # noqa: BLE001 - the engine may be gone already
                    pass

    # -- the server's stream
    def wait_for(self, event_handle: bytes) -> None:
        """Makes the stream wait for the engine's event (recorded after its forward pass)."""
        if not event_handle:
            return
        if len(event_handle) != HANDLE_BYTES:
            raise IpcError(f"an IPC event handle is {HANDLE_BYTES} bytes, got {len(event_handle)}")
        with self._lock, self._cupy.cuda.Device(self.device):
            event = self._opened_events.get(event_handle)
            if event is None:
                try:
                    event = self._rt.ipcOpenEventHandle(bytes(event_handle))
                except Exception as e:  # noqa: BLE001
                    raise IpcError(f"cannot open the engine's CUDA event: {e}") from e
                self._opened_events[event_handle] = event
            self._rt.streamWaitEvent(self._stream.ptr, event, 0)

    def forget_event(self, event_handle: bytes) -> None:
        """Closes an engine's event (its engine unregistered), once queued work no longer needs it."""
        with self._lock:
            event = self._opened_events.pop(event_handle, None)
        if event is not None:
            self._keep_until_marked(_EventCloser(self._rt, event))

    def upload(self, array: np.ndarray) -> Any:
        """``array`` on the device, copied on the stream from a pinned buffer (no host wait)."""
        cupy = self._cupy
        with cupy.cuda.Device(self.device), self._stream:
            pinned = cupy.cuda.alloc_pinned_memory(array.nbytes)
            host = np.frombuffer(pinned, dtype=array.dtype, count=array.size)
            host[:] = array.ravel()
            device = cupy.empty(array.size, dtype=array.dtype)
            device.set(host, stream=self._stream)
        self._keep_until_marked(pinned)  # device memory is stream-ordered by CuPy's pool
        return device

    def launch_pages(self, src: Any, src_words: Any, dst: Any, dst_words: Any, n_pages: int, page_bytes: int,
                     word: int) -> None:
        as_array = self._cuda.as_cuda_array  # sync=False: the stream orders the work, not the host
        with self._cupy.cuda.Device(self.device):
            cuda_launch_pages(as_array(src, sync=False), as_array(src_words, sync=False), as_array(dst, sync=False),
                              as_array(dst_words, sync=False), n_pages, page_bytes, word, stream=self._numba_stream)

    def copy(self, dst: Any, dst_offset: int, src: Any, src_offset: int, nbytes: int) -> None:
        """An async copy between device, staging or pinned host memory (by unified addresses)."""
        with self._cupy.cuda.Device(self.device):
            self._rt.memcpyAsync(dst.data.ptr + dst_offset, src.data.ptr + src_offset, nbytes,
                                 self._rt.memcpyDefault, self._stream.ptr)

    def arena(self) -> Any:
        """The pinned L1 arena as the device sees it."""
        return self._arena_dev

    def staging(self, nbytes: int) -> Any:
        with self._cupy.cuda.Device(self.device):
            return self._cupy.empty(nbytes, dtype=self._cupy.uint8)

    def _keep_until_marked(self, obj: Any) -> None:
        with self._lock:
            self._keep.append(obj)

    def mark(self) -> tuple[int, _Marker]:
        """Records the next server event after everything queued so far: (its index, a
        marker the host waits on, which keeps alive what the queued copies still use)."""
        with self._lock, self._cupy.cuda.Device(self.device):
            index = self._next_event
            self._next_event = (index + 1) % SERVER_EVENTS
            self._rt.eventRecord(self._events[index], self._stream.ptr)
            event = self._cupy.cuda.Event(block=False, disable_timing=True)
            event.record(self._stream)
            marker, self._keep = _Marker(event, self._keep), []
        return index, marker

    def wait_marker(self, marker: _Marker, timeout: float | None = None) -> bool:
        """Waits (polling, not spinning) until the marked work has run; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0001
        try:
            while not marker.event.done:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
        except Exception:
            marker.finish()  # the device failed: nothing queued will use these any more
            raise
        marker.finish()
        return True

    def synchronize(self) -> None:
        with self._cupy.cuda.Device(self.device):
            self._stream.synchronize()

    def close(self) -> None:
        self.synchronize()
        with self._lock, self._cupy.cuda.Device(self.device):
            events, self._opened_events = list(self._opened_events.values()), {}
            for event in events:
                self._rt.eventDestroy(event)
            opened, self._opened = self._opened, {}
            for base, _ in opened.values():  # whoever still counts on them, the server is closing
                try:
                    self._rt.ipcCloseMemHandle(base)
                except Exception:  # noqa: BLE001
                    pass
            if self._pinned:
                try:
                    self._rt.hostUnregister(self._arena_ptr)
                except Exception:  # noqa: BLE001
                    pass
            self._arena_dev = None  # the pool cannot close while a view of it lives


class _Marker:
    """A point on the server's stream, and what the copies queued before it still use."""

    def __init__(self, event: Any, kept: list[Any]) -> None:
        self.event = event
        self._kept = kept

    def finish(self) -> None:
        kept, self._kept = self._kept, []
        for obj in kept:
            if isinstance(obj, _EventCloser):
                obj.close()


class _EventCloser:
    def __init__(self, rt: Any, event: int) -> None:
        self._rt, self._event = rt, event

    def close(self) -> None:
        try:
            self._rt.eventDestroy(self._event)
        except Exception:  # noqa: BLE001
            pass
