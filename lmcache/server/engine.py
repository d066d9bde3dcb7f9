"""CacheEngine: the one home of cache semantics.

The ZMQ loop and the HTTP app are thin faces that call these methods; nothing else decides
what is cached. The engine owns the L1 cache (and its memory pool) and the sessions: the
read locks a request's lookups took, so they can be given back together. It is safe to call
from the ZMQ thread, worker threads and the HTTP loop at once.
"""

from __future__ import annotations

import enum
import importlib.util
import itertools
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from lmcache import __version__
from lmcache._fast.pool import MemoryPool
from lmcache.config import ServerConfig
from lmcache.keys import HASH_BYTES, CacheScope, split_hashes
from lmcache.log import init_logger
from lmcache.storage.eviction import POLICIES
from lmcache.storage.l1 import L1Cache, LockHandle, Reservation
from lmcache.storage.memory import check_fits
from lmcache.transfer import cuda_ipc
from lmcache.transfer.gpu_cache import GpuCache
from lmcache.transfer.layouts import LayoutError, PageLayout
from lmcache.transfer.liveness import LivenessWatch
from lmcache.transfer.registered import RegisteredCache
from lmcache.transfer.shm import SegmentError, arena_name, map_segment, remove_orphan_files, remove_stale_arenas

logger = init_logger(__name__)


class EngineState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


# Registrations at once: each holds mappings and descriptors, so their number is bounded too.
MAX_ENGINES = 1024
# The ticket of a Prepare* that holds nothing; CommitStore/FinishRetrieve accept it as a no-op.
NO_TICKET = 0


class RequestError(ValueError):
    """A well-formed request whose values the engine cannot accept (becomes a bad_request Error)."""


@dataclass
class _Registration:
    instance_id: str
    model: str
    world_size: int
    rank: int
    layout: PageLayout
    mode: str
    blocks_per_chunk: int
    object_bytes: int
    cache: RegisteredCache | GpuCache | None  # engine_driven, cuda_ipc: the server copies pages
    segments: list[str]
    watch: LivenessWatch | None = None  # lmcache_driven: says when the engine's process is gone
    last_seen: float = field(default_factory=time.monotonic)  # its latest store, retrieve or fence

    @property
    def page_format(self) -> str:
        return self.layout.page_format

    def scope(self, salt: str) -> CacheScope:
        return CacheScope(self.model, self.world_size, self.rank, self.page_format, salt)

    def describe(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "model": self.model,
            "world_size": self.world_size,
            "rank": self.rank,
            "mode": self.mode,
            "page_format": self.page_format,
            "layers": self.layout.num_layers,
            "blocks": self.layout.num_blocks,
            "object_bytes": self.object_bytes,
            "segments": self.segments,
            "idle_seconds": round(time.monotonic() - self.last_seen, 1),
        }


@dataclass
class _Ticket:
    kind: str  # "store" or "retrieve"
    registration: _Registration
    handles: list[LockHandle | None]
    created: float = field(default_factory=time.monotonic)
    start: float = field(default_factory=time.perf_counter)


@dataclass
class _Session:
    handles: list[LockHandle] = field(default_factory=list)
    deadline: float = 0.0  # after this, every lock it holds has expired


class CacheEngine:
    # How often idle sessions (all locks expired) are forgotten.
    SESSION_SWEEP_S = 1.0
    # Longest pause between housekeeping rounds (see _reap_until_stopped).
    HOUSEKEEPING_S = 5.0

    def __init__(self, config: ServerConfig, pool: MemoryPool | None = None, gpu_runtime: Any = None) -> None:
        """``gpu_runtime(device_uuid, arena)`` makes the CUDA runtime of a device (by default
        CupyRuntime; tests without a GPU pass a SimulatedRuntime)."""
        self.config = config
        self._make_gpu_runtime = gpu_runtime
        self.server_id = uuid.uuid4().hex
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._state = EngineState.STARTING
        self._failure = ""
        if pool is None:
            check_fits(config.l1_size_bytes, f"--l1-size-gb {config.l1_size_gb:g}", shm=config.l1_shm)
            shm_name = None
            remove_orphan_files()
            if config.l1_shm:
                remove_stale_arenas()
                shm_name = arena_name()
            pool = MemoryPool(config.l1_size_bytes, shm_name=shm_name, prefault=False)  # faulted once serving
        # lmcache_driven needs an arena that engines can map.
        self.transfer_modes = ("engine_driven", "lmcache_driven") if pool.shm_name else ("engine_driven",)
        if importlib.util.find_spec("cupy") is not None:
            self.transfer_modes += ("cuda_ipc",)
        self._gpus: dict[str, Any] = {}  # device UUID -> its CUDA runtime (the first pins the L1 arena)
        self._gpu_done: dict[int, GpuCompletions] = {}  # per runtime: a stuck device stalls only itself
        self._gpu_lock = threading.Lock()  # registrations that create a runtime, one at a time
        self._stopping = threading.Event()  # stops the reaper of idle registrations
        self.l1 = L1Cache(pool, POLICIES[config.eviction_policy], config.lock_ttl_s)
        self._arena = np.frombuffer(pool, dtype=np.uint8)  # what the kernels copy into and out of
        self._engines: dict[str, _Registration] = {}
        self._sessions: dict[str, _Session] = {}
        self._tickets: dict[int, _Ticket] = {}  # lmcache_driven copies in progress
        self._next_sweep = 0.0
        self._clears = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            assert self._state is EngineState.STARTING, self._state
            self._state = EngineState.READY
        self.l1.pool.start_prefault()
        threading.Thread(target=self._reap_until_stopped, name="lmcache-reaper", daemon=True).start()

    def begin_shutdown(self) -> None:
        with self._lock:
            if self._state is EngineState.READY:
                self._state = EngineState.STOPPING
        self._stopping.set()

    def close(self) -> None:
        """Releases everything the engine holds (the pool's memory included); idempotent."""
        self._stopping.set()
        with self._lock:
            if self._state is not EngineState.FAILED:
                self._state = EngineState.STOPPED
            registrations = list(self._engines.values())
            self._engines.clear()
            self._sessions.clear()
            gpus, self._gpus = list(self._gpus.values()), {}
        for reg in registrations:
            self._close_cache(reg)
        for runtime in gpus:  # every device's queued copies run to the end ...
            runtime.synchronize()
        for done in self._gpu_done.values():  # ... and what follows them ...
            done.close()
        for runtime in gpus:  # ... before L1 is unpinned
            runtime.close()
        self.l1.clear()
        del self._arena
        self.l1.pool.close()

    def fail(self, reason: str) -> None:
        """A part the engine depends on (the ZMQ loop) died: unhealthy from now on."""
        with self._lock:
            self._state = EngineState.FAILED
            self._failure = reason
        self._stopping.set()

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): what /healthcheck reports."""
        state = self._state
        if state is EngineState.READY:
            return True, "ready"
        if state is EngineState.FAILED:
            return False, self._failure
        return False, f"engine is {state.value}"

    # --- lookups and locks --------------------------------------------------------------------

    def lookup(
        self,
        scope: CacheScope,
        hashes: bytes,
        all_ranks: bool = False,
        lock: bool = False,
        session: str = "",
    ) -> int:
        """How many leading chunks are cached (for every rank of the scope's world if asked).

        With ``lock``, the counted chunks are read-locked on behalf of ``session`` until it
        releases them, ends, or the lock TTL passes.
        """
        _check_hashes(hashes)
        _check_scope(scope)
        if lock and not session:
            raise RequestError("a locking lookup needs a session id")
        scopes = [scope.for_rank(r) for r in range(scope.world_size)] if all_ranks else [scope]
        if not scope.page_format:
            # The scheduler side cannot know the page format: take each rank's registered one.
            scopes = self._registered_scopes(scopes)
            if not scopes:
                return 0
        count, taken = self.l1.lookup(scopes[0], hashes, lock)
        taken = [taken]
        for s in scopes[1:]:
            count, handles = self.l1.lookup(s, hashes[: count * HASH_BYTES], lock)
            taken.append(handles)
        if lock:
            # Ranks looked up early may have locked chunks past the final count.
            self.l1.release([h for handles in taken for h in handles[count:]])
            kept = [h for handles in taken for h in handles[:count]]
            if kept:
                with self._lock:
                    entry = self._sessions.setdefault(session, _Session())
                    entry.handles.extend(kept)
                    entry.deadline = time.monotonic() + self.config.lock_ttl_s
        self._sweep_sessions()
        return count

    def _registered_scopes(self, scopes: list[CacheScope]) -> list[CacheScope]:
        """The scopes with the page format each rank registered; empty if a rank has not."""
        with self._lock:
            formats = {
                (r.model, r.world_size, r.rank): r.page_format for r in self._engines.values()
            }
        resolved = []
        for s in scopes:
            page_format = formats.get((s.model, s.world_size, s.rank))
            if page_format is None:
                return []
            resolved.append(msgspec.structs.replace(s, page_format=page_format))
        return resolved

    def release_locks(self, session: str, hashes: bytes = b"") -> int:
        """Gives back a session's lookup locks: all of them, or those on ``hashes``."""
        wanted = set(self._split(hashes)) if hashes else None  # empty: all of the session's locks
        with self._lock:
            entry = self._sessions.get(session)
            if entry is None:
                return 0
            if wanted is None:
                mine, entry.handles = entry.handles, []
            else:
                mine = [h for h in entry.handles if h.obj.chunk_hash in wanted]
                entry.handles = [h for h in entry.handles if h.obj.chunk_hash not in wanted]
            if not entry.handles:
                del self._sessions[session]
        return self.l1.release(mine)

    def end_session(self, session: str) -> int:
        """Forgets a request: releases every lock it still holds."""
        return self.release_locks(session)

    # --- registered KV caches ------------------------------------------------------------------

    def register_kv_cache(
        self, instance_id: str, model: str, world_size: int, rank: int, layout: PageLayout, segments: Sequence[str],
        mode: str, cuda: Sequence[cuda_ipc.CudaIpcStorage] = (), liveness: str = "",
    ) -> _Registration:
        """Registers an engine's KV cache; replaces an earlier registration of the same instance
        (an engine that restarted). In engine_driven mode the server maps the engine's storage
        segments and copies pages itself; in cuda_ipc mode it opens the engine's GPU storages
        and copies on its own CUDA stream; in lmcache_driven mode the engine copies, and the
        server only needs the page format and the chunk size."""
        if mode not in self.transfer_modes and mode != "cuda_ipc":  # cuda_ipc: a precise error below
            served = ", ".join(self.transfer_modes)
            raise RequestError(f"transfer mode {mode!r} is not served here (served: {served})")
        _check_scope(CacheScope(model, world_size, rank))
        with self._lock:
            full = instance_id not in self._engines and len(self._engines) >= MAX_ENGINES
        if full:
            raise RequestError(f"cannot register {instance_id}: {MAX_ENGINES} engines are registered already")
        object_bytes = 0
        try:
            layout.validate()
            blocks_per_chunk = layout.blocks_per_chunk(self.config.chunk_size)
            object_bytes = layout.object_bytes(self.config.chunk_size)
            if object_bytes > self.l1.pool.slab_bytes:
                raise LayoutError(
                    f"a chunk of this model is {object_bytes} bytes, more than the L1 pool's slab of "
                    f"{self.l1.pool.slab_bytes} bytes; use a smaller --chunk-size or a larger --l1-size-gb"
                )
            cache: RegisteredCache | GpuCache | None = None
            watch = None
            if mode == "lmcache_driven":
                if not liveness:
                    raise ValueError("an lmcache_driven engine must name its liveness mark (a client too old?)")
                watch = LivenessWatch(liveness)
            elif mode == "engine_driven":
                if len(segments) != len(layout.storage_bytes):
                    raise LayoutError(
                        f"the layout has {len(layout.storage_bytes)} storages but {len(segments)} segments were named"
                    )
                storages = [map_segment(name, size) for name, size in zip(segments, layout.storage_bytes)]
                cache = RegisteredCache(layout, storages, self.config.chunk_size)
            elif mode == "cuda_ipc":
                cache = self._open_gpu_cache(layout, cuda)
        except (LayoutError, SegmentError, ValueError) as e:
            raise RequestError(f"cannot register KV cache of {instance_id}: {e}") from None
        registration = _Registration(
            instance_id, model, world_size, rank, layout, mode, blocks_per_chunk, object_bytes, cache, list(segments),
            watch,
        )
        with self._lock:
            replaced = self._engines.get(instance_id)
            self._engines[instance_id] = registration
        self._close_cache(replaced)
        logger.info("Registered KV cache for GPU ID %s with %d layers", instance_id, layout.num_layers)
        return registration

    def _open_gpu_cache(self, layout: PageLayout, cuda: Sequence[cuda_ipc.CudaIpcStorage]) -> GpuCache:
        device = cuda_ipc.validate(cuda, layout.storage_bytes)
        with self._gpu_lock:
            runtime = self._gpus.get(device)
            if runtime is None:
                from lmcache.transfer.cuda_runtime import CupyRuntime

                first = not self._gpus
                if self._make_gpu_runtime is not None:
                    runtime = self._make_gpu_runtime(device, self._arena)
                else:  # the first pins the whole L1 arena, for every device at once
                    runtime = CupyRuntime(device, self._arena, pin=first)
                self._gpus[device] = runtime
                self._gpu_done[id(runtime)] = GpuCompletions(device, self.l1.renew, self.config.lock_ttl_s / 3)
                if first:
                    logger.info("L1 pinned for GPU engines (%.1f GB)", self._arena.nbytes / 1e9)
        storages, opened = runtime.open_storages(cuda)
        try:
            return GpuCache(layout, storages, self.config.chunk_size, runtime, self.config.gpu_copy, opened)
        except Exception:
            runtime.close_storages(opened)
            raise

    def _completions(self, cache: GpuCache) -> GpuCompletions:
        return self._gpu_done[id(cache.runtime)]

    def fence(self, instance_id: str) -> int:
        """Records a server event after everything queued on the engine's device so far: the
        engine waits for it after a request whose reply it lost (its copies may be queued)."""
        reg = self._registration(instance_id)
        if not isinstance(reg.cache, GpuCache):
            return -1
        index, marker = reg.cache.runtime.mark()
        self._completions(reg.cache).when_done(reg.cache.runtime, marker, lambda ok: None)  # keeps it alive
        return index

    def gpu_event_handles(self, reg: _Registration) -> list[bytes]:
        return list(reg.cache.runtime.event_handles) if isinstance(reg.cache, GpuCache) else []

    def unregister_kv_cache(self, instance_id: str) -> None:
        """Drops a registration; its mappings go once no copy uses them any more."""
        with self._lock:
            reg = self._engines.pop(instance_id, None)
        if reg is None:
            raise RequestError(f"unknown instance id {instance_id!r}")
        self._close_cache(reg)
        logger.info("Unregistered KV cache of GPU ID %s", instance_id)

    def _close_cache(self, reg: _Registration | None) -> None:
        if reg is not None and isinstance(reg.cache, GpuCache):
            reg.cache.close(self._completions(reg.cache).when_done)  # once its queued copies have run

    def store(
        self, instance_id: str, hashes: bytes, block_ids: Sequence[int], salt: str = "", event: bytes = b""
    ) -> tuple[int, int, int, int]:
        """Copies chunks out of registered blocks into L1: (stored, already present, skipped,
        the index of the server's CUDA event that marks the copies done, or -1).

        Runs on a worker thread; the copies happen outside every lock. A chunk becomes visible
        only after its copy completed (for a GPU engine: once the copy queued on the server's
        stream has run; the reply does not wait for it).
        """
        reg = self._registration(instance_id)
        _check_hashes(hashes)
        _check_event(reg, event)
        n = len(hashes) // HASH_BYTES
        blocks = self._blocks(reg, n, block_ids)
        start = time.perf_counter()
        res = self.begin_store(reg.scope(salt), hashes, reg.object_bytes)
        if isinstance(reg.cache, GpuCache):
            return self._store_gpu(reg.cache, blocks, res, event)
        ok = [False] * n
        try:
            for i, handle in enumerate(res.handles):
                if handle is not None:
                    reg.cache.gather(blocks[i], self._arena, handle.obj.offset)
                    ok[i] = True
        finally:
            stored = self.l1.commit(res.handles, ok)
        if stored:
            tokens = stored * self.config.chunk_size
            logger.info("Stored %d tokens in %.3f seconds", tokens, time.perf_counter() - start)
        return stored, res.present, res.skipped, -1

    def _store_gpu(self, cache: GpuCache, blocks: np.ndarray, res: Reservation, event: bytes) -> tuple[int, int, int, int]:
        chosen = [i for i, h in enumerate(res.handles) if h is not None]
        if not chosen:
            return 0, res.present, res.skipped, -1
        try:
            index, marker = cache.gather(blocks[chosen], [res.handles[i].obj.offset for i in chosen], event)
        except Exception as e:
            _drain(cache)  # nothing queued may still write into the slots given back here
            self.l1.commit(res.handles, False)
            raise RequestError(f"cannot queue the GPU copy: {e}") from None
        start = time.perf_counter()

        def publish(ok: bool) -> None:
            stored = self.l1.commit(res.handles, ok)
            if stored:
                logger.info("Stored %d tokens in %.3f seconds", stored * self.config.chunk_size, time.perf_counter() - start)

        self._completions(cache).when_done(cache.runtime, marker, publish, res.handles)
        return len(chosen), res.present, res.skipped, index

    def retrieve(
        self, instance_id: str, hashes: bytes, block_ids: Sequence[int], skip_blocks: int = 0, salt: str = "",
        event: bytes = b"",
    ) -> tuple[int, int]:
        """Copies the leading cached chunks into registered blocks: (how many were written, the
        index of the server's CUDA event that marks the copies done, or -1).

        Stops at the first chunk that is not cached (evicted or cleared since the lookup): the
        blocks of that chunk and every later one are left untouched.
        """
        reg = self._registration(instance_id)
        _check_hashes(hashes)
        _check_event(reg, event)
        n = len(hashes) // HASH_BYTES
        blocks = self._blocks(reg, n, block_ids)
        if skip_blocks < 0:
            raise RequestError(f"skip_blocks must be >= 0 (got {skip_blocks})")
        start = time.perf_counter()
        handles = self.begin_retrieve(reg.scope(salt), hashes)
        if isinstance(reg.cache, GpuCache):
            return self._retrieve_gpu(reg.cache, blocks, handles, skip_blocks, event)
        written = 0
        try:
            bpc = reg.blocks_per_chunk
            for i, handle in enumerate(handles):
                if handle is None:
                    break
                reg.cache.scatter(self._arena, handle.obj.offset, blocks[i], max(0, skip_blocks - i * bpc))
                written += 1
        finally:
            self.l1.release(handles)
        if written:
            tokens = written * self.config.chunk_size
            logger.info("Retrieved %d tokens in %.3f seconds", tokens, time.perf_counter() - start)
        return written, -1

    def _retrieve_gpu(
        self, cache: GpuCache, blocks: np.ndarray, handles: list[LockHandle | None], skip_blocks: int, event: bytes
    ) -> tuple[int, int]:
        leading = next((i for i, h in enumerate(handles) if h is None), len(handles))
        self.l1.release(handles[leading:])
        kept = handles[:leading]
        if not kept:
            return 0, -1
        try:
            index, marker = cache.scatter([h.obj.offset for h in kept], blocks[:leading], skip_blocks, event)
        except Exception as e:
            _drain(cache)  # nothing queued may still write into blocks vLLM now recomputes
            self.l1.release(kept)
            raise RequestError(f"cannot queue the GPU copy: {e}") from None
        start = time.perf_counter()

        def release(ok: bool) -> None:  # the read locks hold until the copies have run
            self.l1.release(kept)
            logger.info("Retrieved %d tokens in %.3f seconds", leading * self.config.chunk_size, time.perf_counter() - start)

        self._completions(cache).when_done(cache.runtime, marker, release, kept)
        return leading, index

    def _registration(self, instance_id: str) -> _Registration:
        reg = self._engines.get(instance_id)
        if reg is None:
            raise RequestError(f"unknown instance id {instance_id!r}: register its KV cache first")
        reg.last_seen = time.monotonic()
        return reg

    def reap_idle_engines(self) -> list[str]:
        """Drops registrations idle for longer than the engine TTL (their engines are taken for
        dead); returns their instance ids."""
        stale = time.monotonic() - self.config.engine_ttl_s
        with self._lock:
            reaped = [reg for reg in self._engines.values() if reg.last_seen < stale]
            for reg in reaped:
                del self._engines[reg.instance_id]
        for reg in reaped:
            self._close_cache(reg)
            logger.info("Dropped the KV cache registration of GPU ID %s: no request for %.0f seconds",
                        reg.instance_id, self.config.engine_ttl_s)
        return [reg.instance_id for reg in reaped]

    def _reap_until_stopped(self) -> None:
        """Housekeeping that must happen without traffic too: idle registrations, expired
        sessions and tickets (a dead engine's orphaned slots), files dead engines left in
        /dev/shm."""
        period = max(0.5, min(self.config.engine_ttl_s / 4, self.config.lock_ttl_s / 2, self.HOUSEKEEPING_S))
        while not self._stopping.wait(period):
            for job in (self.reap_idle_engines, lambda: self._sweep_sessions(force=True), remove_orphan_files):
                try:
                    job()
                except Exception:  # noqa: BLE001 - housekeeping must outlive one bad step
                    logger.exception("During housekeeping")

    @staticmethod
    def _blocks(reg: _Registration, n_chunks: int, block_ids: Sequence[int]) -> np.ndarray:
        if reg.cache is None:
            raise RequestError(f"{reg.instance_id} registered in {reg.mode} mode: it copies its own pages")
        try:
            return reg.cache.check_blocks(n_chunks, block_ids)
        except (ValueError, OverflowError, TypeError) as e:
            raise RequestError(str(e)) from None

    # --- lmcache_driven: the engine copies, between a prepare and a commit/finish -------------

    def prepare_store(self, instance_id: str, hashes: bytes, salt: str = "") -> tuple[int, list[int], int, int]:
        """Reserves slots for the chunks not cached yet: (ticket, offsets (-1: none), present, skipped).

        The engine writes the slots itself, by raw offset: they stay its own until its commit
        or its death (never only a timeout; see storage/l1.py on held reservations).
        """
        reg = self._registration(instance_id)
        if reg.watch is None:
            raise RequestError(f"{instance_id} registered in {reg.mode} mode: the server copies its pages")
        res = self.begin_store(reg.scope(salt), hashes, reg.object_bytes, held=True)
        offsets = [h.obj.offset if h is not None else -1 for h in res.handles]
        return self._ticket(_Ticket("store", reg, res.handles)), offsets, res.present, res.skipped

    def commit_store(self, ticket: int, ok: Sequence[bool], instance_id: str = "") -> tuple[int, int, int]:
        """Publishes the prepared chunks whose copy completed: (stored, present, skipped)."""
        t = self._take_ticket(ticket, "store", instance_id)
        if t is None:
            return 0, 0, 0
        if len(ok) != len(t.handles):
            self.l1.commit(t.handles, False)
            self.l1.release_held(t.handles)
            raise RequestError(f"ticket {ticket} has {len(t.handles)} chunks, {len(ok)} results were sent")
        stored = self.l1.commit(t.handles, [bool(x) for x in ok])
        self.l1.release_held(t.handles)  # the engine is done with them: orphans may go
        if stored:
            logger.info("Stored %d tokens in %.3f seconds", stored * self.config.chunk_size, time.perf_counter() - t.start)
        return stored, 0, 0

    def prepare_retrieve(self, instance_id: str, hashes: bytes, salt: str = "") -> tuple[int, list[int]]:
        """Read-locks the leading cached chunks: (ticket, their offsets in the arena).

        The engine's copy is good only if FinishRetrieve then releases every one of these locks:
        a lock that expired meanwhile (a paused engine) may have let the slot be reused.
        """
        reg = self._registration(instance_id)
        if reg.watch is None:
            raise RequestError(f"{instance_id} registered in {reg.mode} mode: the server copies its pages")
        handles = self.begin_retrieve(reg.scope(salt), hashes)
        leading = next((i for i, h in enumerate(handles) if h is None), len(handles))
        self.l1.release(handles[leading:])
        kept = handles[:leading]
        return self._ticket(_Ticket("retrieve", reg, kept)), [h.obj.offset for h in kept]

    def finish_retrieve(self, ticket: int, instance_id: str = "") -> int:
        t = self._take_ticket(ticket, "retrieve", instance_id)
        if t is None:
            return 0
        released = self.l1.release(t.handles)
        if t.handles:
            tokens = len(t.handles) * self.config.chunk_size
            logger.info("Retrieved %d tokens in %.3f seconds", tokens, time.perf_counter() - t.start)
        return released

    def _ticket(self, ticket: _Ticket) -> int:
        if not any(h is not None for h in ticket.handles):
            return NO_TICKET  # nothing held: nothing to remember (a flood of these costs nothing)
        with self._lock:
            # Random, not counted: a ticket of a server that was replaced, or of another engine,
            # must never name one of this server's (it would publish or free slots in use).
            number = secrets.randbits(62) + 1
            while number in self._tickets:
                number = secrets.randbits(62) + 1
            self._tickets[number] = ticket
        self._sweep_sessions()
        return number

    def _take_ticket(self, number: int, kind: str, instance_id: str = "") -> _Ticket | None:
        """The ticket, taken out; None for NO_TICKET. With ``instance_id``, only that engine's."""
        if number == NO_TICKET:
            return None
        with self._lock:
            ticket = self._tickets.get(number)
            if ticket is None or ticket.kind != kind or instance_id not in ("", ticket.registration.instance_id):
                raise RequestError(f"unknown or expired {kind} ticket {number}")
            del self._tickets[number]
        return ticket

    # --- the brackets every store and retrieve goes through; bytes are copied in between ----------

    def begin_store(self, scope: CacheScope, hashes: bytes, nbytes: int, held: bool = False) -> Reservation:
        _check_scope(scope)
        if nbytes <= 0:
            raise RequestError(f"object size must be positive (got {nbytes})")
        try:
            return self.l1.reserve(scope, self._split(hashes), nbytes, held)
        except ValueError as e:  # e.g. an object larger than a slab
            raise RequestError(str(e)) from None

    def end_store(self, handles: Sequence[LockHandle | None], ok: bool | Sequence[bool] = True) -> int:
        return self.l1.commit(handles, ok)

    def begin_retrieve(self, scope: CacheScope, hashes: bytes) -> list[LockHandle | None]:
        _check_scope(scope)
        return self.l1.acquire(scope, self._split(hashes))

    def end_retrieve(self, handles: Sequence[LockHandle | None]) -> int:
        return self.l1.release(handles)

    # --- admin ------------------------------------------------------------------------------

    def clear(self) -> int:
        """Drops every cached object, locked ones too; returns how many were dropped."""
        dropped = self.l1.clear()
        with self._lock:
            # Sessions stay: releasing their locks is what frees cleared objects under a copy.
            self._clears += 1
        logger.info("Cleared the L1 cache (%d objects)", dropped)
        return dropped

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for /status, the Status message and /metrics."""
        pool = self.l1.pool.stats()
        l1 = self.l1.stats()
        now = time.monotonic()
        with self._lock:
            return {
                "server": {
                    "version": __version__,
                    "server_id": self.server_id,
                    "state": self._state.value,
                    "uptime_seconds": round(time.monotonic() - self._started, 3),
                    "transfer_modes": list(self.transfer_modes),
                },
                "l1": {
                    "capacity_bytes": pool["capacity_bytes"],
                    "used_bytes": l1["used_bytes"],
                    "free_bytes": pool["capacity_bytes"] - pool["allocated_bytes"],
                    "allocated_bytes": pool["allocated_bytes"],
                    "prefaulted_bytes": pool["prefaulted_bytes"],
                    "slab_bytes": pool["slab_bytes"],
                    "free_slabs": pool["free_slabs"],
                    "eviction_policy": self.config.eviction_policy.value,
                    "clears": self._clears,
                    **{k: v for k, v in l1.items() if k != "used_bytes"},
                },
                "engines": [e.describe() for e in self._engines.values()],
                "sessions": {"active": sum(s.deadline > now for s in self._sessions.values())},
                "tickets": {"open": len(self._tickets)},
                "config": self.config.as_dict(),
            }

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _split(hashes: bytes) -> list[bytes]:
        _check_hashes(hashes)
        return split_hashes(hashes)

    def _sweep_sessions(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._next_sweep and not force:
            return
        with self._lock:
            self._next_sweep = now + self.SESSION_SWEEP_S
            for name in [n for n, s in self._sessions.items() if s.deadline <= now]:
                del self._sessions[name]
            # Past its lock TTL, a ticket's locks have expired. A retrieve ticket goes: a late
            # FinishRetrieve finds it unknown, and the engine's load counts as failed. A store
            # ticket stays while its engine lives: the slots it was handed are orphans that
            # only its commit, or its death, gives back.
            stale = now - self.config.lock_ttl_s
            old = [(n, t) for n, t in self._tickets.items() if t.created <= stale]
        gone = []
        for number, ticket in old:
            watch = ticket.registration.watch
            if ticket.kind == "retrieve" or watch is None or not watch.alive():
                gone.append(number)
        with self._lock:
            dropped = [t for n in gone if (t := self._tickets.pop(n, None)) is not None]
        for ticket in dropped:
            if ticket.kind == "store":
                self.l1.release_held(ticket.handles)


def _check_hashes(hashes: bytes) -> None:
    if len(hashes) % HASH_BYTES:
        raise RequestError(f"hashes must be whole {HASH_BYTES}-byte hashes (got {len(hashes)} bytes)")


def _check_scope(scope: CacheScope) -> None:
    if scope.world_size < 1 or not 0 <= scope.rank < scope.world_size:
        raise RequestError(f"rank {scope.rank} is outside a world of size {scope.world_size}")


def _check_event(reg: _Registration, event: bytes) -> None:
    if event and not isinstance(reg.cache, GpuCache):
        raise RequestError(f"{reg.instance_id} is not a GPU engine: its requests carry no CUDA event")
    try:
        cuda_ipc.validate_event(event)
    except ValueError as e:
        raise RequestError(str(e)) from None


def _drain(cache: GpuCache) -> None:
    """Waits until everything queued on the cache's stream has run (error paths only)."""
    try:
        cache.runtime.wait_marker(cache.runtime.mark()[1])
    except Exception as e:  # noqa: BLE001 - the device itself failed; nothing more to wait for
        logger.error("Could not drain the GPU stream: %s", e)


class GpuCompletions:
    """Waits, off the request path, for the copies queued on one device's server stream, then
    runs what must follow them (publishing stored chunks, releasing read locks, closing IPC
    mappings), in queue order."""

    def __init__(self, device: str = "", renew: Any = None, renew_every_s: float = 10.0) -> None:
        """``renew(handles)`` keeps the L1 locks under queued copies from expiring while a slow
        engine holds the stream up."""
        self._queue: queue.SimpleQueue[tuple[Any, Any, Any, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._name = f"lmcache-gpu-done-{device[:8]}"
        self._renew = renew
        self._renew_every_s = renew_every_s
        self._pending: dict[int, Sequence[Any]] = {}  # L1 locks of the copies not done yet
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self._last_renew = time.monotonic()  # renewals are due by the clock, however short each wait

    def when_done(self, runtime: Any, marker: Any, then: Any, handles: Sequence[Any] = ()) -> None:
        self._start()
        key = next(self._ids)
        if handles:
            with self._pending_lock:
                self._pending[key] = handles
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
                        waiting = [h for handles in self._pending.values() for h in handles]
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
