"""The vLLM connector's logic, importing nothing from vLLM: plain ints, lists and tensors.

``SchedulerAdapter`` decides what to load and store; ``WorkerAdapter`` moves the bytes through
kv_transfer.py. vLLM's connector class (lmcache_mp_connector.py) only translates vLLM's objects
for them, and the simulator drives them directly.

How a request goes:
1. Arrival (``on_new_request``): its prompt's chunk hashes are computed once and a locking
   Lookup (all ranks) is sent at once, without waiting.
2. ``get_num_new_matched_tokens`` waits at most ``lookup_wait_ms`` for the answer, else says
   "not known yet" and is asked again. Only whole chunks count, never the whole prompt (vLLM
   must compute one token), and vLLM's own prefix hit is subtracted.
3. ``update_state_after_alloc`` plans the load into the allocated blocks (skipping leading
   blocks vLLM already holds) and gives back the locks on chunks vLLM holds itself. The load runs
   asynchronously on the worker; vLLM waits in WAITING_FOR_REMOTE_KVS until ``finished_recving``.
4. Each step, chunks whose tokens were all computed are stored (prompt chunks; decode chunks
   only with ``save_decode_cache``). ``kv_role`` is honoured: consumers never store, producers
   never load.
5. ``request_finished`` keeps the blocks while stores of the request may be in flight; every
   worker reports it in ``finished_sending`` once its stores are done, so no block leaks.

Never in vLLM's way: every server call has a bounded timeout; a server that is down makes
every request a miss; a worker re-registers in the background when the server comes back.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from lmcache import protocol as p
from lmcache.client import MPClient, ReplyFuture, ServerError, ServerUnavailableError
from lmcache.config import ConnectorConfig, strip_scheme
from lmcache.keys import HASH_BYTES, CacheScope, prompt_hashes
from lmcache.kv_transfer import KVTransfer, MigrationNeeded, TransferStats, register_kv_caches
from lmcache.log import init_logger
from lmcache.protocol import NO_EVENT, TransferMode
from lmcache.transfer.layouts import describe
from lmcache.transfer.shm import Segment, migrate_to_shm

logger = init_logger(__name__)
_FOREVER_S = 7 * 24 * 3600.0  # a Fence is waited for as long as the server is alive


class LoadOp(msgspec.Struct, array_like=True, frozen=True):
    req_id: str
    hashes: bytes
    block_ids: list[int]
    skip_blocks: int
    salt: str


class StoreOp(msgspec.Struct, array_like=True, frozen=True):
    req_id: str
    hashes: bytes
    block_ids: list[int]
    salt: str


class StepMetadata(msgspec.Struct, array_like=True):
    """What the scheduler tells every worker for one step."""

    loads: list[LoadOp] = msgspec.field(default_factory=list)
    stores: list[StoreOp] = msgspec.field(default_factory=list)
    delayed_free: list[str] = msgspec.field(default_factory=list)  # report in finished_sending
    preempted: list[str] = msgspec.field(default_factory=list)


def _client(config: ConnectorConfig) -> MPClient:
    return MPClient(
        strip_scheme(config.host),
        config.port,
        timeout_s=config.timeout_s,
        curve_server_key=config.curve_server_key or None,
        curve_client_secret_file=config.curve_client_secret_file or None,
    )


class _ServerDown:
    """Fails fast while the server is down or silent (killed, paused, overloaded): after one call
    timed out or found no connection, callers are told to skip the server at once, until a Ping
    (one in flight at a time, never waited for) is answered. Without it every call in the outage
    pays the whole ``timeout_s``. Not thread-safe: one per thread that calls."""

    def __init__(self, client: MPClient, what: str) -> None:
        self._client = client
        self._what = what
        self._down = False
        self._probe: ReplyFuture | None = None

    def saw(self, error: ServerUnavailableError) -> None:
        if not self._down:
            logger.warning("LMCache server does not answer (%s): %s are misses until it does", error, self._what)
            self._down = True

    def answers(self) -> bool:
        """False while the server is known down and has not answered a Ping since; never blocks."""
        if not self._down:
            return True
        if self._probe is None:
            try:
                self._probe = self._client.submit(p.Ping(), wait_to_send=False)
            except ServerUnavailableError:
                return False  # not even connected
        if not self._probe.wait(0):  # wait(0) also fails a Ping past its deadline (a silent server)
            return False
        probe, self._probe = self._probe, None
        try:
            probe.result()
        except (ServerUnavailableError, ServerError):
            return False
        logger.info("LMCache server answers again: %s resume", self._what)
        self._down = False
        return True


# --- scheduler side ---------------------------------------------------------------------------


@dataclass
class _Request:
    req_id: str
    tokens: list[int]
    prompt_len: int
    salt: str
    chunk: int = 0  # the chunk size `hashes` were made with (0: none yet)
    hashes: bytes = b""  # chained hashes of the full chunks of `tokens` so far
    lookup: ReplyFuture | None = None
    hit_chunks: int | None = None
    loaded_chunks: int = 0  # chunks loaded from the server (locks held until the load ends)
    block_ids: list[int] = field(default_factory=list)
    stored_chunks: int = 0  # chunks handed to workers for storing
    stores_issued: bool = False


class SchedulerAdapter:
    def __init__(
        self,
        config: ConnectorConfig,
        model: str,
        world_size: int,
        block_size: int,
        kv_role: str = "kv_both",
        client: MPClient | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.world_size = world_size
        self.block_size = block_size
        self.can_load = kv_role != "kv_producer"
        self.can_store = kv_role != "kv_consumer"
        self._client = client or _client(config)
        self._chunk_size: int | None = None
        self._hello: ReplyFuture | None = None
        self._next_hello = 0.0
        self._refused_chunk_size: int | None = None
        self._warned = False
        try:  # ask now (waiting at most a second, once, for the connection); read the answer later
            self._hello = self._client.submit(p.Hello(client_name="vllm-scheduler"), timeout=min(1.0, config.timeout_s))
            self._next_hello = time.monotonic() + config.retry_interval_s
        except ServerUnavailableError:
            self._hello_failed("not reachable at start")
        self._requests: dict[str, _Request] = {}
        self._step = StepMetadata()
        # Else, with the server paused, every new request would wait out timeout_s for its lookup.
        self._down = _ServerDown(self._client, "lookups")

    # -- the server's chunk size: asked without blocking, and again every retry_interval_s: a
    # server restarted on the port may have another (Lookup replies say so too, but a store-only
    # scheduler sends none)
    def chunk_size(self) -> int | None:
        now = time.monotonic()
        if self._hello is None and now >= self._next_hello:
            # Named (so the server logs it) only while the size is not known: not every few seconds.
            ask = p.Hello(client_name="vllm-scheduler" if self._chunk_size is None else "")
            try:
                self._hello = self._client.submit(ask, wait_to_send=False)
            except ServerUnavailableError:
                self._hello_failed("not connected")
                return self._chunk_size
            self._next_hello = now + self.config.retry_interval_s
        # Only the first answer is waited for (briefly); later ones are read once they are there.
        wait_s = self.config.lookup_wait_ms / 1000 if self._chunk_size is None else 0.0
        if self._hello is not None and self._hello.wait(wait_s):
            future, self._hello = self._hello, None
            try:
                hello = future.result()
            except (ServerUnavailableError, ServerError) as e:
                self._hello_failed(str(e))
                return self._chunk_size
            self._adopt(hello.chunk_size if isinstance(hello, p.HelloReply) else 0)
        return self._chunk_size

    def _adopt(self, chunk_size: int) -> None:
        """The server's chunk size, from its Hello or, after it restarted with another, a Lookup reply."""
        if chunk_size <= 0 or chunk_size % self.block_size:
            if chunk_size != self._refused_chunk_size:  # said once per value: the next Hello asks again
                logger.warning("The server's chunk size %d is not a multiple of vLLM's block size %d: caching is off",
                               chunk_size, self.block_size)
            self._chunk_size, self._refused_chunk_size = None, chunk_size
            return
        self._refused_chunk_size = None
        if self._chunk_size is not None and chunk_size != self._chunk_size:
            # Requests hashed with the old size finish without the cache; new ones use the new size.
            logger.warning("The LMCache server's chunk size is now %d, not %d (it restarted): new requests use it",
                           chunk_size, self._chunk_size)
        self._chunk_size = chunk_size

    def _hello_failed(self, why: str) -> None:
        if not self._warned:
            logger.warning("LMCache server not reachable (%s); serving requests without it, retrying", why)
            self._warned = True
        self._next_hello = time.monotonic() + self.config.retry_interval_s

    def _scope(self, salt: str) -> CacheScope:
        return CacheScope(self.model, self.world_size, 0, "", salt)

    def _extend_hashes(self, req: _Request, chunk: int) -> bool:
        """Hashes the request's new full chunks; False if its hashes are of another chunk size."""
        if req.chunk != chunk:
            if req.hashes:
                return False
            req.chunk = chunk
        done = len(req.hashes) // HASH_BYTES
        full = len(req.tokens) // chunk
        if full > done:
            parent = req.hashes[-HASH_BYTES:] if done else None
            req.hashes += prompt_hashes(req.tokens[done * chunk : full * chunk], chunk, parent)
        return True

    def on_new_request(self, req_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        req = _Request(req_id, list(prompt_token_ids), len(prompt_token_ids), cache_salt or "")
        self._requests[req_id] = req
        chunk = self.chunk_size()
        if chunk is None:
            return
        self._extend_hashes(req, chunk)
        if self.can_load and req.hashes and self._down.answers():
            try:
                req.lookup = self._client.submit(
                    p.Lookup(self._scope(req.salt), req.hashes, all_ranks=True, lock=True, session=req_id),
                    wait_to_send=False,
                )
            except ServerUnavailableError:
                req.lookup = None

    def get_num_new_matched_tokens(self, req_id: str, num_computed_tokens: int) -> tuple[int | None, bool]:
        req = self._requests.get(req_id)
        if req is None or not req.chunk or not self.can_load:
            return 0, False
        if req.hit_chunks is None:
            if req.lookup is None:
                req.hit_chunks = 0
            elif not req.lookup.wait(self.config.lookup_wait_ms / 1000):
                if self._down.answers():
                    return None, False  # not known yet: vLLM asks again next step
                req.hit_chunks = 0  # sent before the server was found down: a miss now, not at its timeout
            else:
                try:
                    reply = req.lookup.result()
                    req.hit_chunks = 0
                    if isinstance(reply, p.LookupReply):
                        req.hit_chunks = reply.hit_chunks
                        if reply.chunk_size not in (0, req.chunk):
                            self._adopt(reply.chunk_size)  # the server restarted with another chunk size
                except ServerUnavailableError as e:
                    self._down.saw(e)
                    req.hit_chunks = 0
                except ServerError:
                    req.hit_chunks = 0
        if req.chunk != self._chunk_size:
            req.hit_chunks = 0  # hashed with a chunk size the server no longer has
        chunk = req.chunk
        # Whole chunks only, and never the last prompt token: vLLM must compute at least one.
        loadable = min(req.hit_chunks * chunk, (req.prompt_len - 1) // chunk * chunk)
        need = loadable - num_computed_tokens
        if need <= 0:
            self._end_lookup(req)
            return 0, False
        return need, True

    def update_state_after_alloc(
        self, req_id: str, block_ids: list[int], num_external_tokens: int, num_computed_tokens: int
    ) -> None:
        req = self._requests.get(req_id)
        if req is None:
            return
        req.block_ids = list(block_ids)
        # The request's own chunk size, even if the server's changed since: the load then fails
        # on the server, and vLLM recomputes the blocks it was promised.
        chunk = req.chunk
        if num_external_tokens <= 0 or not chunk:
            self._end_lookup(req)
            return
        bpc = chunk // self.block_size
        first = num_computed_tokens // chunk
        last = (num_computed_tokens + num_external_tokens) // chunk
        skip = (num_computed_tokens - first * chunk) // self.block_size
        self._step.loads.append(
            LoadOp(req_id, req.hashes[first * HASH_BYTES : last * HASH_BYTES], req.block_ids[first * bpc : last * bpc],
                   skip, req.salt)
        )
        req.loaded_chunks = last
        if first:  # vLLM holds these chunks itself
            self._release(req_id, req.hashes[: first * HASH_BYTES])

    def build_step(
        self, scheduled: list[tuple[str, list[int], bool, int, int]], finished: set[str], preempted: set[str]
    ) -> StepMetadata:
        """``scheduled``: per scheduled request (req id, block ids, whether they replace the known
        ones (new or resumed requests) or are added to them, num computed tokens before the step,
        tokens scheduled this step). Returns this step's metadata."""
        chunk = self._chunk_size
        for req_id, blocks, replace, computed, n_scheduled in scheduled:
            req = self._requests.get(req_id)
            if req is None:
                continue
            if replace:
                req.block_ids = list(blocks)
            else:
                req.block_ids.extend(blocks)
            if not self.can_store or chunk is None or not self._extend_hashes(req, chunk):
                continue
            limit = len(req.tokens) if self.config.save_decode_cache else req.prompt_len
            full = min(computed + n_scheduled, limit) // chunk
            full = min(full, len(req.hashes) // HASH_BYTES, len(req.block_ids) // (chunk // self.block_size))
            start = max(req.stored_chunks, req.loaded_chunks)
            if full > start:
                bpc = chunk // self.block_size
                self._step.stores.append(
                    StoreOp(req_id, req.hashes[start * HASH_BYTES : full * HASH_BYTES],
                            req.block_ids[start * bpc : full * bpc], req.salt)
                )
                req.stores_issued = True
            req.stored_chunks = max(req.stored_chunks, full)
        self._step.preempted = sorted(preempted)
        step, self._step = self._step, StepMetadata()
        return step

    def append_tokens(self, req_id: str, token_ids: list[int]) -> None:
        """Generated tokens (decode): they make later chunks storable with save_decode_cache."""
        req = self._requests.get(req_id)
        if req is not None:
            req.tokens.extend(token_ids)

    def sync_tokens(self, req_id: str, all_token_ids: list[int]) -> None:
        """Catches up with a request's growing token list (vLLM's ``all_token_ids``)."""
        req = self._requests.get(req_id)
        if req is not None and len(all_token_ids) > len(req.tokens):
            req.tokens.extend(all_token_ids[len(req.tokens) :])

    def knows(self, req_id: str) -> bool:
        return req_id in self._requests

    def request_finished(self, req_id: str) -> bool:
        """True: keep the request's blocks until every worker reports it finished sending."""
        req = self._requests.pop(req_id, None)
        if req is None:
            return False
        self._end_lookup(req)
        if req.stores_issued:
            self._step.delayed_free.append(req_id)
            return True
        return False

    def update_connector_output(self, finished_sending: set[str] | None, finished_recving: set[str] | None) -> None:
        for req_id in finished_recving or ():
            req = self._requests.get(req_id)
            if req is not None:
                self._release(req_id, req.hashes[: req.loaded_chunks * HASH_BYTES])

    def _end_lookup(self, req: _Request) -> None:
        if req.lookup is not None:
            try:
                self._client.submit(p.EndSession(req.req_id), wait_to_send=False)  # fire and forget
            except ServerUnavailableError:
                pass  # the locks expire on the server

    def _release(self, req_id: str, hashes: bytes) -> None:
        if hashes:
            try:
                self._client.submit(p.ReleaseLocks(req_id, hashes), wait_to_send=False)
            except ServerUnavailableError:
                pass

    def close(self) -> None:
        self._client.close()


# --- worker side ------------------------------------------------------------------------------


class _Moved(NamedTuple):
    """What one load or store on the I/O thread came to."""

    failed_blocks: set[int]  # loads: the blocks not loaded, which vLLM recomputes
    event: int  # GPU engines: the server event after the copies (NO_EVENT: none to wait for)
    kv: KVTransfer | None  # the registration that moved them (None: nothing was sent)


class Copied:
    """A load or store handed to the I/O thread: done once answered and, for a GPU engine, once
    the server's device copies have run (never blocks to find out)."""

    def __init__(self, future: Future[_Moved]) -> None:
        self._future = future

    def done(self) -> bool:
        if not self._future.done():
            return False
        if self._future.exception() is not None:
            return True  # get_finished reports it (and vLLM recomputes)
        moved = self._future.result()
        return moved.kv is None or moved.kv.copied(moved.event)

    def answered(self, timeout: float | None) -> _Moved:
        return self._future.result(timeout)


class WorkerAdapter:
    def __init__(
        self, config: ConnectorConfig, model: str, world_size: int, rank: int, client: MPClient | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.world_size = world_size
        self.rank = rank
        self._client = client or _client(config)
        self._instance_id = instance_id
        self._tensors: list[Any] = []
        self._kv: KVTransfer | None = None
        # engine_driven (re-)registration from the I/O thread: it asks, vLLM's thread moves the
        # tensors into SHM between two steps (never while its forward pass writes them), and the
        # I/O thread sends the segments. Both under _lock.
        self._wants_segments = False
        self._segments: list[Segment] | None = None
        self._next_try = 0.0
        # Else each op queued on the one I/O thread would wait out its own timeout in turn, and
        # the n-th load would keep its request n timeouts in WAITING_FOR_REMOTE_KVS.
        self._down = _ServerDown(self._client, "loads and stores")  # I/O thread only
        self._io = ThreadPoolExecutor(1, thread_name_prefix="lmcache-kv-io")
        self._lock = threading.Lock()
        self._loads: dict[str, list[Copied]] = {}
        self._stores: dict[str, list[Copied]] = {}
        self._delayed: set[str] = set()
        self._load_errors: set[int] = set()

    # -- registration
    def register(self, tensors: list[Any]) -> None:
        logger.info("Registering kv caches!")
        self._tensors = list(tensors)
        self._try_register(on_vllm_thread=True)  # before vLLM's first step: free to move the tensors

    def _try_register(self, on_vllm_thread: bool = False) -> bool:
        if self._kv is not None:
            return True
        if not self._tensors or time.monotonic() < self._next_try:
            return False
        with self._lock:
            if self._wants_segments:
                return False  # until vLLM's thread has moved the tensors
            segments, self._segments = self._segments, None
        try:
            self._kv = register_kv_caches(
                self._client, self._tensors, self.model, self.world_size, self.rank, instance_id=self._instance_id,
                mode=self.config.mp_transfer_mode, migrate=on_vllm_thread, segments=segments,
            )
            return True
        except MigrationNeeded:
            with self._lock:
                self._wants_segments = True
            return False
        except (ServerUnavailableError, ServerError, OSError) as e:
            self._next_try = time.monotonic() + self.config.retry_interval_s
            logger.warning("Could not register the KV cache with the LMCache server (%s); will retry", e)
            return False

    @property
    def transfer_stats(self) -> TransferStats | None:
        """What this worker's registration moved so far (None before it registered)."""
        return self._kv.stats if self._kv is not None else None

    # -- per step
    def _gpu_ready(self) -> bytes | None:
        """GPU engines: marks, on vLLM's own stream, that the blocks may be copied now."""
        kv = self._kv
        return kv.ready() if kv is not None else None

    def _move_tensors(self) -> None:
        """On vLLM's thread, between its forward passes: moves the KV tensors into SHM when the
        I/O thread asked for it (engine_driven registration after a server restart, or with a
        server that was down at start). On the I/O thread a write of the forward pass landing
        between the copy and the swap would be lost from vLLM's own KV cache."""
        with self._lock:
            if not self._wants_segments:
                return
        try:
            segments = migrate_to_shm(self._tensors, describe(self._tensors)[1])
        except OSError as e:  # /dev/shm full: stay unregistered, ask again later
            logger.warning("Could not move the KV cache into shared memory (%s); will retry", e)
            segments = None
            self._next_try = time.monotonic() + self.config.retry_interval_s
        with self._lock:
            self._segments, self._wants_segments = segments, False

    def start_load(self, step: StepMetadata) -> None:
        self._move_tensors()
        if step.loads:
            event = self._gpu_ready()
            for op in step.loads:
                self._loads.setdefault(op.req_id, []).append(Copied(self._io.submit(self._load, op, event)))

    def save(self, step: StepMetadata) -> None:
        self._move_tensors()
        self._delayed.update(step.delayed_free)
        if step.stores:
            event = self._gpu_ready()
            for op in step.stores:
                self._stores.setdefault(op.req_id, []).append(Copied(self._io.submit(self._store, op, event)))

    def handle_preemptions(self, step: StepMetadata) -> None:
        """Preempted requests' blocks are about to be reused: their stores must finish first."""
        for req_id in step.preempted:
            for store in self._stores.pop(req_id, []):
                try:
                    store.answered(timeout=self.config.timeout_s)
                    deadline = time.monotonic() + self.config.timeout_s
                    while not store.done() and time.monotonic() < deadline:
                        time.sleep(0.0005)  # the GPU copy out of these blocks is still running
                except Exception:  # noqa: BLE001 - a failed store is only a future miss
                    pass

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        recving = {r for r, loads in self._loads.items() if all(load.done() for load in loads)}
        for req_id in recving:
            for load in self._loads.pop(req_id):
                failed = load.answered(0).failed_blocks  # _load never raises
                with self._lock:
                    self._load_errors.update(failed)
        sending = set()
        for req_id in list(self._delayed):
            stores = self._stores.get(req_id, [])
            if all(store.done() for store in stores):
                self._stores.pop(req_id, None)
                self._delayed.discard(req_id)
                sending.add(req_id)
        return sending, recving

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every load and store submitted so far has finished (simulator, tests)."""
        self._io.submit(lambda: None).result(timeout)

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    # -- on the I/O thread
    def _usable(self, event: bytes | None) -> KVTransfer | None:
        """The registration to use, or None. A GPU op needs the event recorded on vLLM's stream
        when the step was handed over (the I/O thread's own stream is not ordered after it)."""
        if not self._down.answers():
            return None
        if not self._try_register():
            return None
        kv = self._kv
        if kv is not None and _is_gpu(kv) and event is None:
            return None  # registered after this step began: skip it (a miss, never a wrong byte)
        return kv

    def _load(self, op: LoadOp, event: bytes | None) -> _Moved:
        """Runs a Retrieve; never raises (a failure is a miss: vLLM recomputes the blocks)."""
        written, gpu_event = 0, NO_EVENT
        kv = None
        try:
            kv = self._usable(event)
            if kv is not None:
                written, gpu_event = kv.retrieve(op.hashes, op.block_ids, op.skip_blocks, op.salt, event=event)
        except (ServerUnavailableError, ServerError, OSError, ValueError) as e:
            logger.warning("Load for %s failed (%s); vLLM recomputes it", op.req_id, e)
            gpu_event = self._fence(kv)
            self._lost_registration(e)
        bpc = len(op.block_ids) // max(1, len(op.hashes) // HASH_BYTES)
        return _Moved(set(op.block_ids[max(written * bpc, op.skip_blocks):]), gpu_event, kv)

    def _store(self, op: StoreOp, event: bytes | None) -> _Moved:
        kv = None
        try:
            kv = self._usable(event)
            if kv is not None:
                return _Moved(set(), kv.store(op.hashes, op.block_ids, op.salt, event=event).event, kv)
        except (ServerUnavailableError, ServerError, OSError, ValueError) as e:
            logger.warning("Store for %s failed (%s)", op.req_id, e)
            gpu_event = self._fence(kv)
            self._lost_registration(e)
            return _Moved(set(), gpu_event, kv)
        return _Moved(set(), NO_EVENT, kv)

    def _fence(self, kv: KVTransfer | None) -> int:
        """After a failed GPU op the server may still have its copies queued: the blocks count
        as free only after a server event recorded behind them (the server runs a Fence after
        every earlier request of this engine)."""
        if kv is None or not _is_gpu(kv):
            return NO_EVENT
        try:
            fence = self._client.submit(p.Fence(kv.instance_id), timeout=_FOREVER_S)
            while not fence.wait(self.config.timeout_s):
                # Slow (its Fence queues behind our earlier requests) or gone? Ping is answered
                # at once by a server that is alive; only a server that is gone, and took its
                # queued copies with it, lets the blocks go without the fence.
                self._client.ping(timeout=self.config.timeout_s)
            reply = fence.result()
            return reply.event if isinstance(reply, p.Fenced) else NO_EVENT
        except ServerError as e:
            # The registration is gone (server restarted, or it dropped us): the server closed
            # our memory only after the copies queued on it had run.
            logger.warning("No GPU fence for %s (%s)", kv.instance_id, e)
        except ServerUnavailableError as e:
            logger.error("The LMCache server is gone (%s); releasing the blocks of %s", e, kv.instance_id)
        return NO_EVENT

    def _lost_registration(self, error: Exception) -> None:
        if isinstance(error, ServerUnavailableError):
            self._down.saw(error)
        if isinstance(error, ServerError) and error.code is p.ErrorCode.UNKNOWN_INSTANCE:
            self._kv = None  # the server restarted: register again
            self._next_try = 0.0

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=False)
        for segment in self._segments or []:  # moved, never sent
            segment.unlink()
        self._client.close()


def _is_gpu(kv: KVTransfer) -> bool:
    return kv.mode is TransferMode.CUDA_IPC
