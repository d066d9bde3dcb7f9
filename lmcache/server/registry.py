"""The engines registered with the server: what each one's KV cache looks like, how its pages are
copied, and when a silent one is taken for dead."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from lmcache import protocol as p
from lmcache.keys import CacheScope
from lmcache.log import init_logger
from lmcache.page_layout import LayoutError, PageLayout
from lmcache.protocol import TransferMode
from lmcache.server.copiers import CpuCopier, PageCopier
from lmcache.server.devices import GpuDevices
from lmcache.server.errors import RequestError, UnknownInstanceError
from lmcache.transfer.liveness import LivenessWatch
from lmcache.transfer.registered import RegisteredCache
from lmcache.transfer.shm import SegmentError, map_segment

logger = init_logger(__name__)

# Registrations at once: each holds mappings and descriptors, so their number is bounded too.
MAX_ENGINES = 1024


@dataclass
class Registration:
    spec: p.RegisterKVCache  # who the engine is (instance, model, ranks), its layout and mode
    blocks_per_chunk: int
    object_bytes: int
    copier: PageCopier | None  # None in lmcache_driven mode: the engine copies
    watch: LivenessWatch | None = None  # lmcache_driven: says when the engine's process is gone
    last_seen: float = field(default_factory=time.monotonic)  # its latest store, retrieve or fence

    @property
    def instance_id(self) -> str:
        return self.spec.instance_id

    @property
    def mode(self) -> TransferMode:
        return self.spec.mode

    @property
    def layout(self) -> PageLayout:
        return self.spec.layout

    @property
    def page_format(self) -> str:
        return self.spec.layout.page_format

    def scope(self, salt: str) -> CacheScope:
        s = self.spec
        return CacheScope(s.model, s.world_size, s.rank, self.page_format, salt)

    def server_copier(self) -> PageCopier:
        if self.copier is None:
            raise RequestError(f"{self.instance_id} registered in {self.mode.value} mode: it copies its own pages")
        return self.copier

    def engine_copies(self) -> LivenessWatch:
        if self.watch is None:
            raise RequestError(f"{self.instance_id} registered in {self.mode.value} mode: the server copies its pages")
        return self.watch

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {
            "instance_id": s.instance_id,
            "model": s.model,
            "world_size": s.world_size,
            "rank": s.rank,
            "mode": s.mode.value,
            "page_format": self.page_format,
            "layers": s.layout.num_layers,
            "blocks": s.layout.num_blocks,
            "object_bytes": self.object_bytes,
            "segments": list(s.segments),
            "idle_seconds": round(time.monotonic() - self.last_seen, 1),
        }


class Registry:
    def __init__(self, chunk_size: int, slab_bytes: int, arena: np.ndarray, devices: GpuDevices,
                 modes: tuple[TransferMode, ...]) -> None:
        self._chunk_size = chunk_size
        self._slab_bytes = slab_bytes
        self._arena = arena  # what the server's CPU copies read and write
        self._devices = devices
        self.modes = modes
        self._lock = threading.Lock()
        self._engines: dict[str, Registration] = {}

    def __len__(self) -> int:
        return len(self._engines)

    def register(self, spec: p.RegisterKVCache) -> Registration:
        """Opens an engine's KV cache; replaces an earlier registration of the same instance (an
        engine that restarted). engine_driven: the server maps the engine's storage segments;
        cuda_ipc: it opens the engine's GPU storages; lmcache_driven: the engine copies, and the
        server only needs the page format, the chunk size and the engine's liveness mark."""
        try:
            spec = msgspec.structs.replace(spec, mode=TransferMode(spec.mode))  # a str from an in-process caller
        except ValueError:
            raise RequestError(f"unknown transfer mode {spec.mode!r}") from None
        if spec.mode not in self.modes and spec.mode is not TransferMode.CUDA_IPC:  # cuda_ipc: a precise error below
            served = ", ".join(m.value for m in self.modes)
            raise RequestError(f"transfer mode {spec.mode.value!r} is not served here (served: {served})")
        if spec.rank >= spec.world_size:
            raise RequestError(f"rank {spec.rank} is outside a world of size {spec.world_size}")
        with self._lock:
            full = spec.instance_id not in self._engines and len(self._engines) >= MAX_ENGINES
        if full:
            raise RequestError(f"cannot register {spec.instance_id}: {MAX_ENGINES} engines are registered already")
        try:
            registration = self._open(spec)
        except (LayoutError, SegmentError, ValueError) as e:
            raise RequestError(f"cannot register KV cache of {spec.instance_id}: {e}") from e
        with self._lock:
            replaced = self._engines.get(spec.instance_id)
            self._engines[spec.instance_id] = registration
        _close(replaced)
        logger.info("Registered KV cache for GPU ID %s with %d layers", spec.instance_id, spec.layout.num_layers)
        return registration

    def _open(self, spec: p.RegisterKVCache) -> Registration:
        layout = spec.layout
        layout.validate()
        blocks_per_chunk = layout.blocks_per_chunk(self._chunk_size)
        object_bytes = layout.object_bytes(self._chunk_size)
        if object_bytes > self._slab_bytes:
            raise LayoutError(
                f"a chunk of this model is {object_bytes} bytes, more than the L1 pool's slab of "
                f"{self._slab_bytes} bytes; use a smaller --chunk-size or a larger --l1-size-gb"
            )
        copier: PageCopier | None = None
        watch = None
        if spec.mode is TransferMode.LMCACHE_DRIVEN:
            if not spec.liveness:
                raise ValueError("an lmcache_driven engine must name its liveness mark (a client too old?)")
            watch = LivenessWatch(spec.liveness)
        elif spec.mode is TransferMode.ENGINE_DRIVEN:
            if len(spec.segments) != len(layout.storage_bytes):
                raise LayoutError(
                    f"the layout has {len(layout.storage_bytes)} storages but {len(spec.segments)} segments were named"
                )
            storages = [map_segment(name, size) for name, size in zip(spec.segments, layout.storage_bytes, strict=True)]
            copier = CpuCopier(spec.instance_id, RegisteredCache(layout, storages, self._chunk_size), self._arena)
        else:
            copier = self._devices.open(spec.instance_id, layout, spec.cuda)
        return Registration(spec, blocks_per_chunk, object_bytes, copier, watch)

    def get(self, instance_id: str) -> Registration:
        """The engine's registration, which counts as a sign of life."""
        reg = self._engines.get(instance_id)
        if reg is None:
            raise UnknownInstanceError(f"unknown instance id {instance_id!r}: register its KV cache first")
        reg.last_seen = time.monotonic()
        return reg

    def unregister(self, instance_id: str) -> None:
        """Drops a registration; its mappings go once no copy uses them any more."""
        with self._lock:
            reg = self._engines.pop(instance_id, None)
        if reg is None:
            raise UnknownInstanceError(f"unknown instance id {instance_id!r}")
        _close(reg)
        logger.info("Unregistered KV cache of GPU ID %s", instance_id)

    def reap_idle(self, ttl_s: float) -> list[str]:
        """Drops registrations idle for longer than ``ttl_s`` (their engines are taken for dead);
        returns their instance ids."""
        stale = time.monotonic() - ttl_s
        with self._lock:
            reaped = [reg for reg in self._engines.values() if reg.last_seen < stale]
            for reg in reaped:
                del self._engines[reg.instance_id]
        for reg in reaped:
            _close(reg)
            logger.info("Dropped the KV cache registration of GPU ID %s: no request for %.0f seconds",
                        reg.instance_id, ttl_s)
        return [reg.instance_id for reg in reaped]

    def page_formats(self) -> dict[tuple[str, int, int], str]:
        """(model, world size, rank) -> the page format that rank registered."""
        with self._lock:
            return {(r.spec.model, r.spec.world_size, r.spec.rank): r.page_format for r in self._engines.values()}

    def object_bytes(self, scope: CacheScope) -> int | None:
        """The chunk size of a registered engine of this scope (None: none is registered)."""
        with self._lock:
            for r in self._engines.values():
                s = r.spec
                if (s.model, s.world_size, s.rank, r.page_format) == (scope.model, scope.world_size, scope.rank,
                                                                      scope.page_format):
                    return r.object_bytes
        return None

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            registrations = list(self._engines.values())
        return [r.describe() for r in registrations]

    def close(self) -> None:
        """Drops every registration, and the arena (the pool cannot close while a view lives)."""
        with self._lock:
            registrations = list(self._engines.values())
            self._engines.clear()
        for reg in registrations:
            _close(reg)
        del self._arena


def _close(reg: Registration | None) -> None:
    if reg is not None and reg.copier is not None:
        reg.copier.close()
