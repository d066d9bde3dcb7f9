"""The server's GPUs: one CUDA runtime per device that an engine registered from, and the thread
per device that waits for the copies queued on it (so a stuck device stalls only itself)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmcache.log import init_logger
from lmcache.page_layout import PageLayout
from lmcache.protocol import CudaIpcStorage
from lmcache.server.copiers import GpuCopier
from lmcache.transfer import cuda_ipc
from lmcache.transfer.cuda_runtime import GpuRuntime
from lmcache.transfer.gpu_cache import GpuCache

logger = init_logger(__name__)

# Makes the runtime of a device: (device UUID, the L1 arena, pin the arena?) -> runtime.
RuntimeFactory = Callable[[str, np.ndarray, bool], GpuRuntime]


def cupy_runtime(device: str, arena: np.ndarray, pin: bool) -> GpuRuntime:
    from lmcache.transfer.cuda_runtime import CupyRuntime

    return CupyRuntime(device, arena, pin=pin)


class GpuDevices:
    def __init__(
        self, arena: np.ndarray, chunk_size: int, gpu_copy: str, renew: Callable[[Sequence[Any]], object],
        renew_every_s: float, make_runtime: RuntimeFactory = cupy_runtime,
    ) -> None:
        """``renew(locks)`` keeps the L1 locks under queued copies from expiring."""
        self._arena = arena
        self._chunk_size = chunk_size
        self._gpu_copy = gpu_copy
        self._renew = renew
        self._renew_every_s = renew_every_s
        self._make_runtime = make_runtime
        self._lock = threading.Lock()  # registrations that create a runtime, one at a time
        self._runtimes: dict[str, GpuRuntime] = {}  # device UUID -> runtime (the first pins L1)
        self._done: dict[str, GpuCompletions] = {}

    def open(self, instance_id: str, layout: PageLayout, cuda: Sequence[CudaIpcStorage]) -> GpuCopier:
        """Opens an engine's GPU storages on their device; raises ValueError if they cannot be."""
        device = cuda_ipc.validate(cuda, layout.storage_bytes)
        with self._lock:
            runtime = self._runtimes.get(device)
            if runtime is None:
                first = not self._runtimes  # the first pins the whole L1 arena, for every device at once
                runtime = self._make_runtime(device, self._arena, first)
                self._runtimes[device] = runtime
                self._done[device] = GpuCompletions(device, self._renew, self._renew_every_s)
                if first:
                    logger.info("L1 pinned for GPU engines (%.1f GB)", self._arena.nbytes / 1e9)
            done = self._done[device]
        storages, opened = runtime.open_storages(cuda)
        try:
            cache = GpuCache(layout, storages, self._chunk_size, runtime, self._gpu_copy, opened)
        except Exception:
            runtime.close_storages(opened)
            raise
        return GpuCopier(instance_id, cache, done.when_done)

    def close(self) -> None:
        """Every device's queued copies run to the end, then what follows them, then the
        runtimes close (L1 is unpinned only after that)."""
        with self._lock:
            runtimes, self._runtimes = list(self._runtimes.values()), {}
            done, self._done = list(self._done.values()), {}
        for runtime in runtimes:
            runtime.synchronize()
        for d in done:
            d.close()
        for runtime in runtimes:
            runtime.close()
        del self._arena  # the pool cannot close while a view of it lives


class GpuCompletions:
    """Waits, off the request path, for the copies queued on one device's server stream, then
    runs what must follow them (publishing stored chunks, releasing read locks, closing IPC
    mappings), in queue order."""

    def __init__(self, device: str = "", renew: Callable[[Sequence[Any]], object] | None = None,
                 renew_every_s: float = 10.0) -> None:
        """``renew(locks)`` keeps the L1 locks under queued copies from expiring while a slow
        engine holds the stream up."""
        self._queue: queue.SimpleQueue[tuple[Any, Any, Callable[[bool], None], int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._name = f"lmcache-gpu-done-{device[:8]}"
        self._renew = renew
        self._renew_every_s = renew_every_s
        self._pending: dict[int, Sequence[Any]] = {}  # L1 locks of the copies not done yet
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self._last_renew = time.monotonic()  # renewals are due by the clock, however short each wait

    def when_done(self, runtime: Any, marker: Any, then: Callable[[bool], None], locks: Sequence[Any] = ()) -> None:
        self._start()
        key = next(self._ids)
        if locks:
            with self._pending_lock:
                self._pending[key] = locks
        self._queue.put((runtime, marker, then, key))

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            runtime, marker, then, key = item
            ok = True
            try:
                while not runtime.wait_marker(marker, max(0.0, self._last_renew + self._renew_every_s - time.monotonic())):
                    with self._pending_lock:
                        waiting = [h for locks in self._pending.values() for h in locks]
                    if self._renew is not None:
                        self._renew(waiting)
                    self._last_renew = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a failed copy: its chunks are dropped
                logger.error("A GPU copy failed: %s", e)
                ok = False
            with self._pending_lock:
                self._pending.pop(key, None)
            try:
                then(ok)
            except Exception:  # noqa: BLE001
                logger.exception("After a GPU copy")

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
