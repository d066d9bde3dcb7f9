"""The engine side of every transfer mode: registers vLLM's KV tensors with the server and moves
their pages. It mirrors the server's copiers (server/copiers.py):

- ``ServerCopies`` (engine_driven, cuda_ipc): the server copies; this side sends Store and
  Retrieve, and for a GPU engine says which of the server's CUDA events marks the copies done.
- ``EngineCopies`` (lmcache_driven): this process copies, between the server's PrepareStore /
  PrepareRetrieve and its CommitStore / FinishRetrieve, into and out of the L1 arena it maps.

``register_kv_caches`` picks the mode and returns one of them; all talking goes through an
MPClient (client.py), which knows nothing of pages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from lmcache import protocol as p
from lmcache.client import MPClient
from lmcache.keys import HASH_BYTES, CacheScope
from lmcache.log import init_logger
from lmcache.page_layout import PageLayout
from lmcache.protocol import AUTO_MODE, CPU_MODE_CHOICES, NO_EVENT, TransferMode
from lmcache.transfer.layouts import describe
from lmcache.transfer.liveness import process_mark
from lmcache.transfer.registered import RegisteredCache, storage_array
from lmcache.transfer.shm import ARENA_PREFIX, Segment, map_segment, migrate_to_shm

logger = init_logger(__name__)



class Stored(NamedTuple):
    stored: int  # chunks copied into L1 (GPU: queued, published once copied)
    present: int  # already cached, or being cached by another request
    skipped: int  # no room in L1
    event: int = NO_EVENT  # GPU engines: the server event marking the copies done


class Retrieved(NamedTuple):
    retrieved: int  # leading chunks written into the blocks
    event: int = NO_EVENT


@dataclass
class TransferStats:
    """What this engine moved, and the time its calls took (the simulator reports these)."""

    stored_chunks: int = 0
    store_seconds: float = 0.0
    retrieved_chunks: int = 0
    retrieve_seconds: float = 0.0


class KVTransfer:
    """One engine's registered KV cache: stores chunks from its blocks, retrieves into them."""

    def __init__(self, client: MPClient, request: p.RegisterKVCache, reply: p.Registered) -> None:
        self.client = client
        self.instance_id = request.instance_id
        self.model = request.model
        self.world_size = request.world_size
        self.rank = request.rank
        self.layout: PageLayout = request.layout
        self.mode = TransferMode(request.mode)
        self.page_format = reply.page_format
        self.blocks_per_chunk = reply.blocks_per_chunk
        self.stats = TransferStats()

    def scope(self, salt: str = "") -> CacheScope:
        return CacheScope(self.model, self.world_size, self.rank, self.page_format, salt)

    def ready(self) -> bytes | None:
        """GPU engines: marks "the blocks may be copied now" on the current stream and returns
        the event to pass to store/retrieve; None for CPU engines."""
        return None

    def copied(self, event: int) -> bool:
        """True once the server's copies behind ``event`` have run (never blocks)."""
        return True

    def store(self, hashes: bytes, block_ids: Sequence[int], salt: str = "", timeout: float | None = None,
              event: bytes | None = None) -> Stored:
        """Copies the chunks ``hashes`` from ``block_ids`` (blocks_per_chunk per chunk) into L1."""
        start = time.perf_counter()
        result = self._store(hashes, block_ids, salt, timeout, event)
        self.stats.store_seconds += time.perf_counter() - start
        self.stats.stored_chunks += result.stored
        return result

    def retrieve(self, hashes: bytes, block_ids: Sequence[int], skip_blocks: int = 0, salt: str = "",
                 timeout: float | None = None, event: bytes | None = None) -> Retrieved:
        """Copies the leading cached chunks into ``block_ids`` (never the first ``skip_blocks``)."""
        start = time.perf_counter()
        result = self._retrieve(hashes, block_ids, skip_blocks, salt, timeout, event)
        self.stats.retrieve_seconds += time.perf_counter() - start
        self.stats.retrieved_chunks += result.retrieved
        return result

    def unregister(self, timeout: float | None = None) -> None:
        self.client.call(p.UnregisterKVCache(self.instance_id), p.Unregistered, timeout)

    def _store(self, hashes: bytes, block_ids: Sequence[int], salt: str, timeout: float | None,
               event: bytes | None) -> Stored:
        raise NotImplementedError

    def _retrieve(self, hashes: bytes, block_ids: Sequence[int], skip_blocks: int, salt: str,
                  timeout: float | None, event: bytes | None) -> Retrieved:
        raise NotImplementedError


class ServerCopies(KVTransfer):
    """engine_driven and cuda_ipc: the server copies the pages."""

    def __init__(self, client: MPClient, request: p.RegisterKVCache, reply: p.Registered, gpu: Any = None) -> None:
        super().__init__(client, request, reply)
        self.gpu = gpu  # cuda_ipc: the engine's GpuSync

    def ready(self) -> bytes | None:
        return self.gpu.ready() if self.gpu is not None else None

    def copied(self, event: int) -> bool:
        return self.gpu is None or self.gpu.done(event)

    def _limits(self, timeout: float | None) -> tuple[float, float]:
        """(timeout, deadline): the deadline is when this call gives up and its blocks go back
        to vLLM (reused, or recomputed), and the server copies nothing after it. Taken before the
        request is sent, so it is never later than the client's own deadline (the server shares
        this host's CLOCK_MONOTONIC)."""
        timeout = self.client.timeout_s if timeout is None else timeout
        return timeout, time.monotonic() + timeout

    def _event(self, event: bytes | None) -> bytes:
        if self.gpu is not None and event is None:
            event = self.gpu.ready()  # on this thread's stream: pass ``event`` from vLLM's
        return event or b""

    def _store(self, hashes: bytes, block_ids: Sequence[int], salt: str, timeout: float | None,
               event: bytes | None) -> Stored:
        timeout, deadline = self._limits(timeout)
        request = p.Store(self.instance_id, hashes, list(block_ids), salt, self._event(event), deadline)
        r = self.client.call(request, p.StoreReply, timeout)
        return Stored(stored=r.stored, present=r.present, skipped=r.skipped, event=r.event)

    def _retrieve(self, hashes: bytes, block_ids: Sequence[int], skip_blocks: int, salt: str,
                  timeout: float | None, event: bytes | None) -> Retrieved:
        timeout, deadline = self._limits(timeout)
        request = p.Retrieve(self.instance_id, hashes, list(block_ids), skip_blocks, salt, self._event(event), deadline)
        r = self.client.call(request, p.RetrieveReply, timeout)
        return Retrieved(retrieved=r.retrieved, event=r.event)


class EngineCopies(KVTransfer):
    """lmcache_driven: this process copies its own pages into and out of the server's arena."""

    def __init__(self, client: MPClient, request: p.RegisterKVCache, reply: p.Registered,
                 storages: Sequence[Any]) -> None:
        super().__init__(client, request, reply)
        self.arena = map_segment(reply.l1_segment, reply.l1_bytes, prefix=ARENA_PREFIX)
        chunk_size = reply.blocks_per_chunk * request.layout.block_size
        self.cache = RegisteredCache(request.layout, [storage_array(s) for s in storages], chunk_size)

    def _store(self, hashes: bytes, block_ids: Sequence[int], salt: str, timeout: float | None,
               event: bytes | None) -> Stored:
        blocks = self.cache.check_blocks(len(hashes) // HASH_BYTES, block_ids)
        prepare = p.PrepareStore(self.instance_id, hashes, salt)
        slots = self.client.call(prepare, p.Slots, timeout, undo=_undo_slots(prepare))
        ok = [False] * len(slots.offsets)
        try:
            for i, offset in enumerate(slots.offsets):
                if offset >= 0:
                    self.cache.gather(blocks[i], self.arena, offset)
                    ok[i] = True
        finally:
            reply = self.client.call(p.CommitStore(slots.ticket, ok, self.instance_id), p.StoreReply, timeout)
        return Stored(stored=reply.stored, present=slots.present, skipped=slots.skipped)

    def _retrieve(self, hashes: bytes, block_ids: Sequence[int], skip_blocks: int, salt: str,
                  timeout: float | None, event: bytes | None) -> Retrieved:
        blocks = self.cache.check_blocks(len(hashes) // HASH_BYTES, block_ids)
        prepare = p.PrepareRetrieve(self.instance_id, hashes, salt)
        slots = self.client.call(prepare, p.Slots, timeout, undo=_undo_slots(prepare))
        written = 0
        try:
            bpc = self.blocks_per_chunk
            for i, offset in enumerate(slots.offsets):
                self.cache.scatter(self.arena, offset, blocks[i], max(0, skip_blocks - i * bpc))
                written += 1
        finally:
            finish = p.FinishRetrieve(slots.ticket, self.instance_id)
            released = self.client.call(finish, p.Released, timeout).locks
        if released != len(slots.offsets):
            # A lock expired while this process copied (it was paused longer than the lock TTL):
            # the slot may have held another chunk by then. Nothing copied counts as loaded.
            logger.warning(
                "Load of %d chunk(s) discarded: %d of their locks expired during the copy",
                len(slots.offsets), len(slots.offsets) - released,
            )
            return Retrieved(0)
        return Retrieved(written)


def _undo_slots(request: p.PrepareStore | p.PrepareRetrieve) -> Callable[[p.Reply], p.Request | None]:
    """For a Prepare* whose Slots arrive too late: commit nothing, or release the locks."""

    def undo(reply: p.Reply) -> p.Request | None:
        if not isinstance(reply, p.Slots):
            return None
        if isinstance(request, p.PrepareStore):
            return p.CommitStore(reply.ticket, [False] * len(reply.offsets), request.instance_id)
        return p.FinishRetrieve(reply.ticket, request.instance_id)

    return undo


class MigrationNeeded(RuntimeError):
    """engine_driven needs the tensors moved into SHM first. Only the thread that writes them (vLLM's)
    may move them: a write between the copy and the swap would be lost."""


def register_kv_caches(
    client: MPClient,
    tensors: Sequence[Any],
    model: str,
    world_size: int = 1,
    rank: int = 0,
    instance_id: str | None = None,
    kv_split: str | None = None,
    mode: str = AUTO_MODE,
    timeout: float | None = None,
    *,
    migrate: bool = True,
    segments: list[Segment] | None = None,
) -> KVTransfer:
    """Registers vLLM's per-layer KV tensors with the server ``client`` talks to.

    GPU tensors are always registered in ``cuda_ipc`` mode: the server opens them over CUDA IPC
    and copies on its own stream. For CPU tensors, ``mode``: ``engine_driven`` moves the tensors'
    storages into POSIX SHM segments (the tensors keep working and keep their contents) and the
    server copies pages itself; the segment names are unlinked once the server has answered, so
    nothing is left behind if either side dies. ``lmcache_driven`` keeps the tensors where they
    are: this process copies pages into and out of the server's L1 arena, which it maps.
    ``auto`` picks lmcache_driven when the server offers it, else engine_driven.

    ``segments``: ones ``migrate_to_shm`` already moved the tensors into (on the thread that owns
    them); they are unlinked here either way. Without them, engine_driven migrates here, or with
    ``migrate=False`` (a thread racing vLLM's writes) raises MigrationNeeded.
    """
    logger.info("Registering kv caches!")
    given = list(segments or [])
    try:
        return _register(client, list(tensors), model, world_size, rank, instance_id, kv_split, mode, timeout,
                         migrate, given)
    finally:
        for segment in given:  # unused (the server now offers lmcache_driven, or it failed), or used
            segment.unlink()


def _register(
    client: MPClient, tensors: list[Any], model: str, world_size: int, rank: int, instance_id: str | None,
    kv_split: str | None, mode: str, timeout: float | None, migrate: bool, given: list[Segment],
) -> KVTransfer:
    instance_id = instance_id or f"{os.getpid()}"
    layout, storages = describe(tensors, kv_split)
    if tensors and getattr(tensors[0], "is_cuda", False):
        return _register_gpu(client, tensors, storages, model, world_size, rank, instance_id, layout, mode, timeout)
    picked = _cpu_mode(client, mode, timeout)
    logger.info("Creating transfer context (device_type=cpu, mode=%s)", picked.value)
    segments: list[Segment] = []
    if picked is TransferMode.ENGINE_DRIVEN:
        if given:
            segments = given
        elif migrate:
            segments = migrate_to_shm(tensors, storages)
        else:
            raise MigrationNeeded("engine_driven: the KV tensors must move into SHM on vLLM's thread first")
    liveness = process_mark() if picked is TransferMode.LMCACHE_DRIVEN else ""
    request = p.RegisterKVCache(
        instance_id, model, world_size, rank, layout, [s.name for s in segments], picked, liveness=liveness
    )
    try:
        reply = client.call(request, p.Registered, timeout)
    finally:
        for segment in segments:
            segment.unlink()
    if picked is TransferMode.LMCACHE_DRIVEN:
        return EngineCopies(client, request, reply, storages)
    return ServerCopies(client, request, reply)


def _cpu_mode(client: MPClient, mode: str, timeout: float | None) -> TransferMode:
    if mode not in CPU_MODE_CHOICES:
        raise ValueError(f"unknown transfer mode {mode!r} ({', '.join(CPU_MODE_CHOICES)})")
    offered = client.hello(client_name="kv-engine", timeout=timeout).transfer_modes
    auto = TransferMode.LMCACHE_DRIVEN if TransferMode.LMCACHE_DRIVEN.value in offered else TransferMode.ENGINE_DRIVEN
    if mode == AUTO_MODE:
        return auto
    if mode != auto.value:
        logger.info("Transfer mode %s (overridden; auto would pick %s)", mode, auto.value)
    return TransferMode(mode)


def _register_gpu(
    client: MPClient, tensors: list[Any], storages: list[Any], model: str, world_size: int, rank: int,
    instance_id: str, layout: PageLayout, mode: str, timeout: float | None,
) -> ServerCopies:
    from lmcache.transfer.cuda_engine import GpuSync
    from lmcache.transfer.cuda_ipc import export_storages

    if mode not in (AUTO_MODE, TransferMode.CUDA_IPC.value):
        raise ValueError(f"GPU KV caches are registered in cuda_ipc mode, not {mode!r}")
    logger.info("Creating transfer context (device_type=cuda, mode=cuda_ipc)")
    request = p.RegisterKVCache(
        instance_id, model, world_size, rank, layout, [], TransferMode.CUDA_IPC, export_storages(storages)
    )
    reply = client.call(request, p.Registered, timeout)
    return ServerCopies(client, request, reply, GpuSync(tensors[0].device, reply.events))
