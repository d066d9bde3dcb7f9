"""CacheEngine: the one home of cache semantics.

The ZMQ loop and the HTTP app are thin faces that call these methods; nothing else decides what
is cached. The engine owns the L1 cache (and its memory pool), the sessions (the read locks a
request's lookups took, so they can be given back together) and the lmcache_driven tickets. It
leaves registrations to registry.py and the copying of pages to copiers.py. It is safe to call
from the ZMQ thread, worker threads and the HTTP loop at once.

Store and retrieve are written once for every transfer mode: reserve (or read-lock) in L1, have
the pages copied, then publish (or release) when the copy has completed, now or later.
"""

from __future__ import annotations

import enum
import importlib.util
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import numpy as np

from lmcache import __version__
from lmcache import protocol as p
from lmcache._fast.hashing import xxh3_128
from lmcache._fast.pool import MemoryPool
from lmcache.config import GIB, ServerConfig
from lmcache.keys import HASH_BYTES, MAX_NAME_CHARS, CacheScope, split_hashes
from lmcache.log import init_logger
from lmcache.protocol import NO_EVENT, TransferMode
from lmcache.server.activity import Activity
from lmcache.server.copiers import Outcome
from lmcache.server.devices import GpuDevices, RuntimeFactory, cupy_runtime
from lmcache.server.errors import RequestError
from lmcache.server.registry import Registry
from lmcache.server.tickets import Ticket, TicketKind, Tickets
from lmcache.storage.eviction import POLICIES
from lmcache.storage.l1 import L1Cache, LockHandle, Reservation
from lmcache.storage.l2.controller import L2
from lmcache.storage.l2.tier import TierClearError
from lmcache.storage.l2.tiers import open_tiers
from lmcache.storage.memory import check_fits
from lmcache.transfer.shm import arena_name, remove_orphan_files, remove_stale_arenas

logger = init_logger(__name__)


class EngineState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class StoreResult(NamedTuple):
    stored: int  # chunks copied into L1 (for a GPU engine: queued, published once copied)
    present: int  # already cached, or being cached by another request
    skipped: int  # no room in L1
    event: int = NO_EVENT  # GPU engines: the server event that marks the copies done


class RetrieveResult(NamedTuple):
    retrieved: int  # leading chunks written into the blocks; later blocks are untouched
    event: int = NO_EVENT


class SlotGrant(NamedTuple):
    """lmcache_driven: the slots a Prepare* hands the engine, until its Commit/Finish."""

    ticket: int
    offsets: list[int]  # arena offset per chunk; -1: nothing to copy for it (stores only)
    present: int = 0
    skipped: int = 0


class EngineRegistered(NamedTuple):
    page_format: str
    blocks_per_chunk: int
    object_bytes: int
    l1_segment: str  # lmcache_driven: the arena the engine maps ...
    l1_bytes: int  # ... and its size
    events: list[bytes]  # cuda_ipc: the server's interprocess events


@dataclass
class _Session:
    handles: list[LockHandle] = field(default_factory=list)
    deadline: float = 0.0  # after this, every lock it holds has expired


class CacheEngine:
    # How often idle sessions (all locks expired) are forgotten.
    SESSION_SWEEP_S = 1.0
    # The share of L1 one lmcache_driven engine may hold in prepared, uncommitted stores.
    MAX_HELD_SHARE = 0.5
    # Longest pause between housekeeping rounds (see _reap_until_stopped).
    HOUSEKEEPING_S = 5.0
    # Salts with a quota of their own (PUT /quota/{salt}); many more tenants can run on the default.
    MAX_QUOTAS = 4096

    def __init__(
        self, config: ServerConfig, pool: MemoryPool | None = None, gpu_runtime: RuntimeFactory | None = None,
    ) -> None:
        """``gpu_runtime(device_uuid, arena, pin)`` makes the CUDA runtime of a device (by default
        CupyRuntime; tests without a GPU pass a simulated one)."""
        self.config = config
        self.server_id = uuid.uuid4().hex
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._state = EngineState.STARTING
        self._failure = ""
        # First: a directory another server holds refuses the start before any memory is taken.
        tiers = open_tiers(config.l2_adapters, config.l2_prefetch_deadline_ms / 1000)
        if pool is None:
            check_fits(config.l1_size_bytes, f"--l1-size-gb {config.l1_size_gb:g}", shm=config.l1_shm)
            shm_name = None
            remove_orphan_files()
            if config.l1_shm:
                remove_stale_arenas()
                shm_name = arena_name()
            pool = MemoryPool(config.l1_size_bytes, shm_name=shm_name, prefault=False)  # faulted once serving
        modes = [TransferMode.ENGINE_DRIVEN]
        if pool.shm_name:  # lmcache_driven needs an arena that engines can map
            modes.append(TransferMode.LMCACHE_DRIVEN)
        if importlib.util.find_spec("cupy") is not None:
            modes.append(TransferMode.CUDA_IPC)
        self.transfer_modes = tuple(modes)
        self._stopping = threading.Event()  # stops the housekeeping thread
        self.l1 = L1Cache(pool, POLICIES[config.eviction_policy], config.lock_ttl_s)
        self.l1.default_quota = int(config.default_quota_gb * GIB) or None
        self._arena = np.frombuffer(pool, dtype=np.uint8)  # what the kernels copy into and out of
        self._devices = GpuDevices(
            self._arena, config.chunk_size, config.gpu_copy, self.l1.renew, config.lock_ttl_s / 3,
            gpu_runtime or cupy_runtime,
        )
        self.registry = Registry(config.chunk_size, pool.slab_bytes, self._arena, self._devices, self.transfer_modes)
        self.l2: L2 | None = None
        if tiers:
            self.l2 = L2(tiers, self.l1, int(config.l2_write_queue_mb * (1 << 20)),
                         config.l2_prefetch_deadline_ms / 1000, config.chunk_size)
        self._sessions: dict[str, _Session] = {}
        self._tickets = Tickets()
        self._next_sweep = 0.0
        self._clears = 0
        self.activity = Activity(config.chunk_size)

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
            self._sessions.clear()
        self.registry.close()
        self._devices.close()  # every queued GPU copy has run (and published) before ...
        if self.l2 is not None:
            self.l2.close()  # ... the queued L2 writes finish (bounded), while L1 still holds them
        self.l1.clear()
        del self._arena
        self.l1.pool.close()

    @property
    def stopping(self) -> bool:
        """Shutdown has begun (or the engine is closed)."""
        return self._stopping.is_set()

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
        load: bool = True,
    ) -> int:
        """How many leading chunks are cached (for every rank of the scope's world if asked).

        With ``lock``, the counted chunks are read-locked on behalf of ``session`` until it
        releases them, ends, or the lock TTL passes. With ``load`` (and L2 tiers), the chunks
        the tiers hold past the L1 hits are loaded first, waiting up to the prefetch deadline;
        a caller that must not wait (the ZMQ loop thread) passes False.
        """
        _check_hashes(hashes)
        _check_scope(scope)
        if lock and not session:
            raise RequestError("a locking lookup needs a session id")
        start = time.perf_counter()
        scopes = self._lookup_scopes(scope, all_ranks)
        if not scopes:
            return 0
        if load and self.l2 is not None:
            self.l2.prefetch(scopes, _split(hashes), self.registry.object_bytes)
        count, first = self.l1.lookup(scopes[0], hashes, lock)
        taken = [first]
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
        self._sweep()
        self.activity.looked_up(len(hashes) // HASH_BYTES, count, time.perf_counter() - start)
        return count

    def lookup_loads(self, scope: CacheScope, hashes: bytes, all_ranks: bool = False) -> bool:
        """Whether a lookup would load chunks from L2 first (and so may wait for a disk): told
        from the indexes alone, so the ZMQ loop can answer every other lookup at once."""
        if self.l2 is None or len(hashes) % HASH_BYTES or scope.world_size < 1:
            return False
        split = _split(hashes)
        return any(self.l2.would_load(s, split) for s in self._lookup_scopes(scope, all_ranks))

    def _lookup_scopes(self, scope: CacheScope, all_ranks: bool) -> list[CacheScope]:
        scopes = [scope.for_rank(r) for r in range(scope.world_size)] if all_ranks else [scope]
        if not scope.page_format:
            # The scheduler side cannot know the page format: take each rank's registered one.
            scopes = self._registered_scopes(scopes)
        return scopes

    def _registered_scopes(self, scopes: list[CacheScope]) -> list[CacheScope]:
        """The scopes with the page format each rank registered; empty if a rank has not."""
        formats = self.registry.page_formats()
        resolved = []
        for s in scopes:
            page_format = formats.get((s.model, s.world_size, s.rank))
            if page_format is None:
                return []
            resolved.append(msgspec.structs.replace(s, page_format=page_format))
        return resolved

    def release_locks(self, session: str, hashes: bytes = b"") -> int:
        """Gives back a session's lookup locks: all of them, or those on ``hashes``."""
        wanted = set(_split(hashes)) if hashes else None  # empty: all of the session's locks
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

    # --- registered engines ---------------------------------------------------------------

    def register_kv_cache(self, spec: p.RegisterKVCache) -> EngineRegistered:
        """Registers an engine's KV cache (see Registry.register)."""
        reg = self.registry.register(spec)
        arena = reg.mode is TransferMode.LMCACHE_DRIVEN
        return EngineRegistered(
            page_format=reg.page_format,
            blocks_per_chunk=reg.blocks_per_chunk,
            object_bytes=reg.object_bytes,
            l1_segment=(self.l1.pool.shm_name or "") if arena else "",
            l1_bytes=self.l1.pool.size if arena else 0,
            events=reg.copier.event_handles() if reg.copier is not None else [],
        )

    def unregister_kv_cache(self, instance_id: str) -> None:
        self.registry.unregister(instance_id)

    def fence(self, instance_id: str) -> int:
        """Records a server event after everything queued on the engine's device so far: the
        engine waits for it after a request whose reply it lost (its copies may be queued)."""
        copier = self.registry.get(instance_id).copier
        return copier.fence() if copier is not None else NO_EVENT

    # --- the server copies: store and retrieve ----------------------------------------------

    def store(
        self, instance_id: str, hashes: bytes, block_ids: Sequence[int], salt: str = "", event: bytes = b"",
        deadline: float = 0.0,
    ) -> StoreResult:
        """Copies chunks out of registered blocks into L1.

        Runs on a worker thread; the copies happen outside every lock. A chunk becomes visible
        only after its copy completed (for a GPU engine: once the copy queued on the server's
        stream has run; the reply does not wait for it), and only if that was before the
        engine's ``deadline``: past it the engine gave up and vLLM may have reused the blocks for
        another request, so what was read from them may not be this chunk (see _expired).
        """
        reg = self.registry.get(instance_id)
        copier = reg.server_copier()
        blocks = copier.check(_count(hashes), block_ids, event)
        if _expired(deadline, "store", instance_id):
            return StoreResult(0, 0, 0)
        res = self.begin_store(reg.scope(salt), hashes, reg.object_bytes)
        chosen = [i for i, h in enumerate(res.handles) if h is not None]
        if not chosen:
            return StoreResult(0, res.present, res.skipped)
        handles = [h for h in res.handles if h is not None]  # in the order of chosen
        stored = [0]
        start = time.perf_counter()

        def publish(ok: Outcome) -> None:
            if _expired(deadline, "store", instance_id):
                ok = False  # read (at least partly) after the engine gave up: maybe another request's KV
            stored[0] = self._publish(handles, ok, start)

        then = _once(publish)
        try:
            index = copier.store(blocks[chosen], [h.obj.offset for h in handles], event, then, handles)
        except BaseException:
            then(False)  # nothing more will be copied: give the slots back
            raise
        # Copied already (CPU): what was published. Queued (GPU): what will be, once copied.
        return StoreResult(stored[0] if index == NO_EVENT else len(chosen), res.present, res.skipped, index)

    def retrieve(
        self, instance_id: str, hashes: bytes, block_ids: Sequence[int], skip_blocks: int = 0, salt: str = "",
        event: bytes = b"", deadline: float = 0.0,
    ) -> RetrieveResult:
        """Copies the leading cached chunks into registered blocks.

        Stops at the first chunk that is not cached (evicted or cleared since the lookup): the
        blocks of that chunk and every later one are left untouched. Past the engine's
        ``deadline`` nothing is written: the engine told vLLM these blocks failed, and vLLM
        recomputes them or hands them to another request.
        """
        reg = self.registry.get(instance_id)
        copier = reg.server_copier()
        blocks = copier.check(_count(hashes), block_ids, event)
        if skip_blocks < 0:
            raise RequestError(f"skip_blocks must be >= 0 (got {skip_blocks})")
        if _expired(deadline, "retrieve", instance_id):
            return RetrieveResult(0)
        kept = self._leading(self.begin_retrieve(reg.scope(salt), hashes))
        if not kept:
            return RetrieveResult(0)
        start = time.perf_counter()

        def release(ok: Outcome) -> None:  # the read locks hold until the copies have run
            self.l1.release(kept)
            if ok:
                self._finished("retrieve", len(kept), kept[0].obj.nbytes, start)

        then = _once(release)
        try:
            index = copier.load([h.obj.offset for h in kept], blocks[: len(kept)], skip_blocks, event, then, kept)
        except BaseException:
            then(False)
            raise
        return RetrieveResult(len(kept), index)

    # --- the engine copies (lmcache_driven), between a prepare and a commit/finish ----------

    def prepare_store(self, instance_id: str, hashes: bytes, salt: str = "") -> SlotGrant:
        """Reserves slots for the chunks not cached yet (offset -1: none for that chunk).

        The engine writes the slots itself, by raw offset: they stay its own until its commit
        or its death (never only a timeout; see storage/l1.py on held reservations). So one
        engine holds at most MAX_HELD_SHARE of L1 at once: one that prepares and never commits
        (a bug, a stuck process) must not take the whole of it from the others; past that, the
        prompt's later chunks are not stored.
        """
        reg = self.registry.get(instance_id)
        reg.engine_copies()
        _check_hashes(hashes)
        held = self._tickets.held_bytes(instance_id)
        wanted = len(hashes) // HASH_BYTES
        room = int(self.MAX_HELD_SHARE * self.l1.pool.size) - held
        # At least one chunk while it holds none, however large a chunk is against L1.
        allowed = min(wanted, max(room // reg.object_bytes, 0 if held else 1))
        if allowed < wanted:
            hashes = hashes[: allowed * HASH_BYTES]
        res = self.begin_store(reg.scope(salt), hashes, reg.object_bytes, held=True)
        handles = res.handles + [None] * (wanted - allowed)  # one per chunk asked, as the commit's results
        offsets = [h.obj.offset if h is not None else -1 for h in handles]
        ticket = self._issue(Ticket(TicketKind.STORE, reg, handles))
        return SlotGrant(ticket, offsets, res.present, res.skipped + wanted - allowed)

    def commit_store(self, ticket: int, ok: Sequence[bool], instance_id: str = "") -> StoreResult:
        """Publishes the prepared chunks whose copy completed."""
        t = self._tickets.take(ticket, TicketKind.STORE, instance_id)
        if t is None:
            return StoreResult(0, 0, 0)
        try:
            if len(ok) != len(t.handles):
                self.l1.commit(t.handles, False)
                raise RequestError(f"ticket {ticket} has {len(t.handles)} chunks, {len(ok)} results were sent")
            return StoreResult(self._publish(t.handles, [bool(x) for x in ok], t.start), 0, 0)
        finally:
            self.l1.release_held(t.handles)  # the engine is done with them: orphans may go

    def prepare_retrieve(self, instance_id: str, hashes: bytes, salt: str = "") -> SlotGrant:
        """Read-locks the leading cached chunks and says where they are in the arena.

        The engine's copy is good only if FinishRetrieve then releases every one of these locks:
        a lock that expired meanwhile (a paused engine) may have let the slot be reused.
        """
        reg = self.registry.get(instance_id)
        reg.engine_copies()
        kept = self._leading(self.begin_retrieve(reg.scope(salt), hashes))
        return SlotGrant(self._issue(Ticket(TicketKind.RETRIEVE, reg, list(kept))), [h.obj.offset for h in kept])

    def finish_retrieve(self, ticket: int, instance_id: str = "") -> int:
        """Releases a prepared retrieve's locks; returns how many were still held."""
        t = self._tickets.take(ticket, TicketKind.RETRIEVE, instance_id)
        if t is None:
            return 0
        released = self.l1.release(t.handles)
        kept = [h for h in t.handles if h is not None]
        if kept:
            self._finished("retrieve", len(kept), kept[0].obj.nbytes, t.start)
        return released

    def _issue(self, ticket: Ticket) -> int:
        number = self._tickets.issue(ticket)
        self._sweep()
        return number

    # --- the brackets every store and retrieve goes through; bytes are copied in between ----------

    def begin_store(self, scope: CacheScope, hashes: bytes, nbytes: int, held: bool = False) -> Reservation:
        _check_scope(scope)
        if nbytes <= 0:
            raise RequestError(f"object size must be positive (got {nbytes})")
        try:
            return self.l1.reserve(scope, _split(hashes), nbytes, held)
        except ValueError as e:  # e.g. an object larger than a slab
            raise RequestError(str(e)) from None

    def end_store(self, handles: Sequence[LockHandle | None], ok: bool | Sequence[bool] = True) -> int:
        return self.l1.commit(handles, ok)

    def begin_retrieve(self, scope: CacheScope, hashes: bytes) -> list[LockHandle | None]:
        _check_scope(scope)
        return self.l1.acquire(scope, _split(hashes))

    def end_retrieve(self, handles: Sequence[LockHandle | None]) -> int:
        return self.l1.release(handles)

    def _leading(self, handles: list[LockHandle | None]) -> list[LockHandle]:
        """The locks on the leading run of cached chunks; the rest are released at once."""
        leading = next((i for i, h in enumerate(handles) if h is None), len(handles))
        self.l1.release(handles[leading:])
        return [h for h in handles[:leading] if h is not None]

    def _publish(self, handles: Sequence[LockHandle | None], ok: Outcome, start: float) -> int:
        stored = self.l1.commit(handles, ok)
        if stored:
            objects = [h.obj for h in handles if h is not None]
            self._finished("store", stored, objects[0].nbytes, start)
            if self.l2 is not None:
                self.l2.write_through(objects[0].scope, [o.chunk_hash for o in objects])
        return stored

    def _finished(self, operation: str, chunks: int, chunk_bytes: int, start: float) -> None:
        """Logs and counts a store or retrieve (every chunk of one request has the same size)."""
        seconds = time.perf_counter() - start
        self.activity.moved(operation, chunks, chunks * chunk_bytes, seconds)
        # Six decimals: a store of a few chunks takes well under a millisecond.
        logger.info("%s %d tokens in %.6f seconds", "Stored" if operation == "store" else "Retrieved",
                    chunks * self.config.chunk_size, seconds)

    # --- admin ------------------------------------------------------------------------------

    def clear(self, l2: bool = False) -> int:
        """Drops every cached object, locked ones too (and with ``l2`` every chunk of the L2
        tiers); returns how many were dropped. Raises TierClearError if a tier could not be
        cleared (L1 and the other tiers are cleared all the same)."""
        dropped = self.l1.clear()
        with self._lock:
            # Sessions stay: releasing their locks is what frees cleared objects under a copy.
            self._clears += 1
        logger.info("Cleared the L1 cache (%d objects)", dropped)
        if l2 and self.l2 is not None:
            try:
                on_disk = self.l2.clear()
            except TierClearError as e:
                logger.warning("Clearing the L2 tiers failed, their chunks may still be served: %s", e)
                raise
            logger.info("Cleared the L2 tiers (%d objects)", on_disk)
            dropped += on_disk
        return dropped

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for /status, the Status message and /metrics."""
        pool = self.l1.pool.stats()
        l1 = self.l1.stats()
        engines = self.registry.describe()
        now = time.monotonic()
        with self._lock:
            return {
                "server": {
                    "version": __version__,
                    "server_id": self.server_id,
                    "state": self._state.value,
                    "uptime_seconds": round(time.monotonic() - self._started, 3),
                    "transfer_modes": [m.value for m in self.transfer_modes],
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
                    # Of the chunks lookups asked L1 about, the share it held.
                    "hit_rate": round(l1["hits"] / (l1["hits"] + l1["misses"]), 4) if l1["hits"] + l1["misses"] else None,
                },
                "activity": self.activity.snapshot(),
                "tenants": _tenant_ids(self.l1.tenants(TOP_TENANTS)),
                "l2": self.l2.status() if self.l2 is not None else {"tiers": []},
                "engines": engines,
                "sessions": {"active": sum(s.deadline > now for s in self._sessions.values())},
                "tickets": {"open": len(self._tickets)},
                "config": self.config.as_dict(),
            }

    # --- tenants ------------------------------------------------------------------------------

    def set_quota(self, salt: str, limit_gb: float | None) -> None:
        """What one cache salt may hold in L1 (None: the default, --default-quota-gb)."""
        _check_salt(salt)
        quotas = self.l1.quotas()  # a copy, taken under L1's lock: once
        if limit_gb is not None and salt not in quotas and len(quotas) >= self.MAX_QUOTAS:
            # Each quota keeps its tenant's figures for good: the table must stay bounded.
            raise RequestError(f"at most {self.MAX_QUOTAS} salts have their own quota; DELETE one first")
        if limit_gb is not None and (isinstance(limit_gb, bool) or not isinstance(limit_gb, (int, float))
                                     or not 0 <= limit_gb <= self.config.l1_size_gb):
            raise RequestError(f"limit_gb must be a number from 0 to the L1 size {self.config.l1_size_gb:g} (got {limit_gb!r})")
        self.l1.set_quota(salt, None if limit_gb is None else int(limit_gb * GIB))

    def quota(self, salt: str) -> dict[str, Any]:
        _check_salt(salt)  # GET: the same answer as PUT and DELETE
        own = self.l1.quotas().get(salt)
        limit = own if own is not None else self.l1.default_quota
        return {"tenant": tenant_id(salt), "limit_gb": None if limit is None else round(limit / GIB, 6), "own": own is not None}

    def quotas(self) -> dict[str, Any]:
        default = self.l1.default_quota
        return {"default_limit_gb": None if default is None else round(default / GIB, 6),
                "quotas": [{"tenant": tenant_id(s), "limit_gb": round(b / GIB, 6)} for s, b in sorted(self.l1.quotas().items())]}

    # --- housekeeping -------------------------------------------------------------------------

    def reap_idle_engines(self) -> list[str]:
        """Drops registrations idle for longer than the engine TTL; returns their instance ids."""
        return self.registry.reap_idle(self.config.engine_ttl_s)

    def _reap_until_stopped(self) -> None:
        """Housekeeping that must happen without traffic too: idle registrations, expired
        sessions and tickets (a dead engine's orphaned slots), files dead engines left in
        /dev/shm."""
        period = max(0.5, min(self.config.engine_ttl_s / 4, self.config.lock_ttl_s / 2, self.HOUSEKEEPING_S))
        jobs: list[Callable[[], object]] = [self.reap_idle_engines, lambda: self._sweep(force=True), remove_orphan_files]
        while not self._stopping.wait(period):
            for job in jobs:
                try:
                    job()
                except Exception:  # noqa: BLE001 - housekeeping must outlive one bad step
                    logger.exception("During housekeeping")

    def _sweep(self, force: bool = False) -> None:
        """Ends sessions and tickets past the lock TTL, giving back their locks (at most once a
        SESSION_SWEEP_S unless forced: it runs on the request path). L1 expires an object's read
        locks only when all of them are past the TTL, so on a chunk others keep locking, the
        locks of an abandoned request (aborted, or its engine killed) go only here."""
        now = time.monotonic()
        if now < self._next_sweep and not force:
            return
        with self._lock:
            self._next_sweep = now + self.SESSION_SWEEP_S
            expired = [n for n, s in self._sessions.items() if s.deadline <= now]
            abandoned = [h for n in expired for h in self._sessions.pop(n).handles]
        self.l1.release(abandoned)
        self._tickets.sweep(self.config.lock_ttl_s, self.l1.release_held, self.l1.release)


def _once(then: Callable[[Outcome], None]) -> Callable[[Outcome], None]:
    """``then``, callable many times but run only the first (a copier that failed after calling
    it, and the engine's own clean-up, may both call it)."""
    lock = threading.Lock()
    pending = [then]

    def once(ok: Outcome) -> None:
        with lock:
            todo = pending.pop() if pending else None
        if todo is not None:
            todo(ok)

    return once


def _expired(deadline: float, operation: str, instance_id: str) -> bool:
    """Whether an engine's Store or Retrieve came past its deadline (0: none). The engine gave
    up on it then (the server was paused, or busy) and told vLLM the blocks are free or failed;
    a copy after that would read another request's KV, or write into blocks vLLM now owns.
    Engines copied by the server share its host, hence its CLOCK_MONOTONIC."""
    if not deadline or time.monotonic() < deadline:
        return False
    logger.warning("%s for %s came after the engine gave up on it; nothing copied", operation, instance_id)
    return True


def _count(hashes: bytes) -> int:
    _check_hashes(hashes)
    return len(hashes) // HASH_BYTES


def _split(hashes: bytes) -> list[bytes]:
    _check_hashes(hashes)
    return split_hashes(hashes)


def _check_hashes(hashes: bytes) -> None:
    if len(hashes) % HASH_BYTES:
        raise RequestError(f"hashes must be whole {HASH_BYTES}-byte hashes (got {len(hashes)} bytes)")


def _check_scope(scope: CacheScope) -> None:
    if scope.world_size < 1 or not 0 <= scope.rank < scope.world_size:
        raise RequestError(f"rank {scope.rank} is outside a world of size {scope.world_size}")


# /status and /metrics show the tenants holding the most, the rest summed.
TOP_TENANTS = 10


def tenant_id(salt: str) -> str:
    """How a cache salt is shown: a salt keeps tenants apart, so it is never printed, only a
    short digest of it ("" for requests without one)."""
    return xxh3_128(salt.encode("utf-8", "surrogatepass")).hex()[:12] if salt else ""


def _check_salt(salt: str) -> None:
    """A salt a request could carry (msgpack strings are UTF-8: a lone surrogate is none)."""
    if len(salt) > MAX_NAME_CHARS:
        raise RequestError(f"a cache salt is at most {MAX_NAME_CHARS} characters (no request could carry this one)")
    try:
        salt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"a cache salt must be valid Unicode text ({e.reason} at {e.start})") from None


def _tenant_ids(tenants: dict[str, Any]) -> dict[str, Any]:
    return {**tenants, "top": [{"tenant": tenant_id(t.pop("salt")), **t} for t in tenants["top"]]}
