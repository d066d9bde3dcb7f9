"""The Redis tier: a store shared by every server of a fleet, so a prefix computed anywhere is a
hit everywhere. Redis (or Valkey, or a Redis Cluster) owns its memory and its eviction; this
tier keeps no index and no byte count of its own.

One key per chunk, ``lmcache:<namespace>:v1:<scope digest>:<chunk hash>`` (hex), holding the
same header + payload as the disk tier's files (chunk_file.py): an eviction by Redis drops a
whole chunk, and a value that fails its header, scope or checksum is a miss (and is deleted).
The key has no ``{}`` hash tag, so a cluster spreads chunks over all its slots. The scope digest
stands for the model, world size, rank, page format and cache salt: tenants never share a key.

- Writes: one round trip asks which chunks of a batch Redis already has (keys are content
  addressed and never change), then the missing ones go out in a transaction (per chunk on a
  cluster: one slot per transaction), header and payload as SET + APPEND, straight from L1
  memory (no copy on the client). A chunk whose L1 lock expired under the send is deleted.
- Reads: one GET per chunk, on a pool of connections, so a 32 MiB chunk does not hold up the
  small calls. Existence checks for a lookup are pipelined (STRLEN) on a pool of their own with
  the lookup's deadline as timeout.
- Failures: every call has a timeout; failed calls feed a circuit breaker (breaker.py), and
  while it is open the tier is skipped at once. Nothing a Redis does reaches vLLM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, PythonRespSerializer
from redis.crc import key_slot
from redis.retry import Retry

from lmcache.config import redacted_url
from lmcache.log import init_logger
from lmcache.storage.l2 import chunk_file
from lmcache.storage.l2.breaker import Breaker
from lmcache.storage.l2.chunk_file import HEADER_BYTES, BadChunk
from lmcache.storage.l2.tier import Outgoing, TierClearError

logger = init_logger(__name__)

KEY_VERSION = "v1"
# Errors that say Redis answered and refused one command: a failed call only. Any other error
# (a cluster that is down included) says it is unreachable, unwell or not Redis: the breaker's.
_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.NoPermissionError)
_T = TypeVar("_T")


@dataclass
class RedisCounters:
    written_chunks: int = 0
    written_bytes: int = 0
    present_chunks: int = 0  # already in Redis when asked before a write: not sent again
    read_chunks: int = 0
    read_bytes: int = 0
    misses: int = 0
    corrupt: int = 0  # values that failed their header, scope or checksum: deleted, never served
    evictions: int = 0  # Redis evicts on its own; it does not tell us
    write_errors: int = 0
    skipped_calls: int = 0  # calls not made because the breaker was open


class _Connection(Connection):
    """Sends a memoryview as it is: hiredis's command packer would copy every payload twice.
    Replies are still parsed by hiredis."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._command_packer = PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


class RedisTier:
    def __init__(self, kind: str, url: str, nodes: Sequence[str], namespace: str, connections: int,
                 timeout_s: float, lookup_timeout_s: float) -> None:
        """``kind`` "redis" (one server at ``url``) or "redis-cluster" (seed ``nodes``,
        "host:port"). ``lookup_timeout_s`` bounds the existence checks a lookup waits for."""
        self.kind = kind
        self._url, self._nodes, self._namespace = url, list(nodes), namespace
        self._prefix = f"lmcache:{namespace}:{KEY_VERSION}:".encode()
        self._connections, self._timeout_s, self._lookup_timeout_s = connections, timeout_s, lookup_timeout_s
        self.counters = RedisCounters()
        self._counting = threading.Lock()
        self._bulk: redis.Redis | RedisCluster | None = None  # made by the first probe
        self._lookups: redis.Redis | RedisCluster | None = None
        self.breaker = Breaker(f"{kind} tier {self.endpoint}", self._connect)

    @property
    def endpoint(self) -> str:
        return ",".join(self._nodes) if self.kind == "redis-cluster" else redacted_url(self._url)

    # --- connections -------------------------------------------------------------------------

    def _client(self, timeout_s: float, connections: int) -> redis.Redis | RedisCluster:
        options: dict[str, Any] = dict(
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            max_connections=connections, socket_read_size=1 << 20,
        )
        if self.kind == "redis-cluster":
            seeds = [ClusterNode(*_host_port(n)) for n in self._nodes]
            # Given a URL, redis-py makes the node pools with our connection class.
            return RedisCluster(url=f"redis://{self._nodes[0]}", startup_nodes=seeds, connection_class=_Connection,
                                **options)
        if urlsplit(self._url).scheme == "redis":  # TLS and unix sockets keep redis-py's own connections
            options["connection_class"] = _Connection
        return redis.Redis(connection_pool=redis.ConnectionPool.from_url(self._url, **options))

    def _connect(self) -> None:
        """The breaker's probe: makes the clients if they are not made yet, then PINGs."""
        if self._bulk is None:
            self._bulk = self._client(self._timeout_s, self._connections)
        if self._lookups is None:
            self._lookups = self._client(self._lookup_timeout_s, 4)
        self._bulk.ping()

    def _call(self, client: redis.Redis | RedisCluster | None, use: Callable[[Any], _T], default: _T) -> _T:
        """``use(client)``, or ``default`` if the breaker is open or the call fails."""
        if client is None or not self.breaker.allows():
            with self._counting:
                self.counters.skipped_calls += 1
            return default
        try:
            result = use(client)
        except _REFUSED as e:  # Redis answered, and refused this one command (OOM, read-only)
            logger.warning("L2 %s tier %s: %s", self.kind, self.endpoint, e)
            return default
        except Exception as e:  # noqa: BLE001
            # Unreachable, unwell, or not speaking Redis at all (a reply redis-py cannot parse
            # fails in its own code, with any exception): to vLLM all are a miss, and all are
            # the breaker's business.
            self.breaker.failed(e)
            return default
        self.breaker.succeeded()
        return result

    def _key(self, scope_key: bytes, chunk_hash: bytes) -> bytes:
        return b"%s%s:%s" % (self._prefix, scope_key.hex().encode(), chunk_hash.hex().encode())

    # --- the Tier protocol -------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self.breaker.allows()

    def __contains__(self, key: tuple[bytes, bytes]) -> bool:
        return False  # shared: only Redis knows, and it is asked before each write

    def may_hold(self, scope_key: bytes, chunk_hash: bytes) -> bool:
        return self.breaker.allows()

    def held(self, scope_key: bytes, chunk_hashes: Sequence[bytes]) -> list[int | None]:
        def ask(client: Any) -> list[int | None]:
            pipe = client.pipeline(transaction=False)
            for h in chunk_hashes:
                pipe.strlen(self._key(scope_key, h))
            # A key of another type answers WRONGTYPE: a foreign value, reported as size -1.
            return [(n - HEADER_BYTES if n else None) if isinstance(n, int) else -1
                    for n in pipe.execute(raise_on_error=False)]

        if not chunk_hashes:
            return []
        return self._call(self._lookups, ask, [None] * len(chunk_hashes))

    def put_many(self, chunks: Sequence[Outgoing]) -> list[bool]:
        keys = [self._key(c.scope_key, c.chunk_hash) for c in chunks]
        done = [False] * len(chunks)

        def write(client: Any) -> list[bool]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            missing = []
            for i, present in enumerate(_ints(pipe.execute())):
                if present:
                    done[i] = True
                else:
                    missing.append(i)
            with self._counting:
                self.counters.present_chunks += len(chunks) - len(missing)
            # The checksum is taken, then the lock asked: still valid, the checksum is the chunk's.
            headers = {i: chunk_file.pack(chunks[i].tokens, chunks[i].scope_key, chunks[i].chunk_hash, chunks[i].payload)
                       for i in missing}
            sending = [i for i in missing if chunks[i].still_valid()]
            for group in self._transactions(sending, keys):
                tx = client.pipeline(transaction=True)
                for i in group:
                    tx.set(keys[i], headers[i])
                    tx.append(keys[i], _bytes_view(chunks[i].payload))
                _ints(tx.execute()[1::2])  # each APPEND answers the value's length
                for i in group:
                    # Still locked after the send: the slot was never reused under it.
                    if chunks[i].still_valid():
                        done[i] = True
                        with self._counting:
                            self.counters.written_chunks += 1
                            self.counters.written_bytes += HEADER_BYTES + len(chunks[i].payload)
                    else:
                        client.delete(keys[i])
            return done

        if self._call(self._bulk, write, None) is None:
            with self._counting:
                self.counters.write_errors += 1
        return done

    def _transactions(self, indexes: list[int], keys: list[bytes]) -> list[list[int]]:
        """One transaction for the whole batch on one server; one per slot on a cluster."""
        if self.kind != "redis-cluster":
            return [indexes] if indexes else []
        slots: dict[int, list[int]] = {}
        for i in indexes:
            slots.setdefault(key_slot(keys[i]), []).append(i)
        return list(slots.values())

    def get(self, scope_key: bytes, chunk_hash: bytes, into: memoryview) -> bool:
        key = self._key(scope_key, chunk_hash)
        raw = self._call(self._bulk, lambda c: _get(c, key), None)
        if raw is None:
            with self._counting:
                self.counters.misses += 1
            return False
        try:
            header = chunk_file.unpack(raw)
            payload = memoryview(raw)[HEADER_BYTES:]
            chunk_file.verify(header, scope_key, chunk_hash, payload)
            target = _bytes_view(into)
            if len(target) != len(payload):
                raise BadChunk(f"payload is {len(payload)} bytes, the slot {len(target)}")
            target[:] = payload
        except BadChunk as e:
            logger.warning("L2 %s tier %s: %s is damaged (%s); deleted, counted as a miss",
                           self.kind, self.endpoint, key.decode(), e)
            self.delete(scope_key, chunk_hash, damaged=True)
            return False
        with self._counting:
            self.counters.read_chunks += 1
            self.counters.read_bytes += len(raw)
        return True

    def delete(self, scope_key: bytes, chunk_hash: bytes, damaged: bool = False) -> None:
        with self._counting:
            self.counters.corrupt += damaged
        key = self._key(scope_key, chunk_hash)
        self._call(self._bulk, lambda c: c.delete(key), 0)

    def clear(self) -> int:
        """Deletes this namespace's chunks, for every server that shares it."""
        def drop(client: Any) -> int:
            dropped = 0
            batch: list[bytes] = []
            for key in client.scan_iter(match=self._prefix + b"*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    dropped += client.unlink(*batch)
                    batch = []
            if batch:
                dropped += client.unlink(*batch)
            return dropped

        dropped = self._call(self._bulk, drop, None)
        if dropped is None:
            raise TierClearError(f"{self.kind} tier {self.endpoint} was not cleared: "
                                 f"{self.breaker.last_error or self.breaker.state.value}")
        return dropped

    def status(self) -> dict[str, Any]:
        with self._counting:
            counters = asdict(self.counters)
        breaker = self.breaker.status()
        return {
            "type": self.kind, "endpoint": self.endpoint, "namespace": self._namespace,
            "capacity_bytes": None, "used_bytes": None, "objects": None,  # Redis keeps those: INFO memory
            **breaker, **counters,
        }

    def close(self) -> None:
        """Stops the prober and closes every connection, also those under a call in flight:
        a Redis that answers a byte at a time never times out, and must not hold up shutdown
        (the call fails at once, as a miss)."""
        self.breaker.close()
        for client in (self._bulk, self._lookups):
            if isinstance(client, redis.Redis):
                client.connection_pool.disconnect(inuse_connections=True)  # ours: close() leaves it open
            if client is not None:
                client.close()


def _get(client: Any, key: bytes) -> bytes | None:
    """The value, or b"" (not a chunk: deleted as damaged) for a key of another type."""
    try:
        value = client.get(key)
    except redis.ResponseError as e:
        if "WRONGTYPE" not in str(e):
            raise
        return b""
    return value if value is None or isinstance(value, bytes) else b""


def _ints(replies: list[Any]) -> list[int]:
    """Replies that must be integers; anything else means the other end does not speak Redis
    (a failure for the breaker, never a chunk taken for written)."""
    if not all(isinstance(r, int) for r in replies):
        raise redis.exceptions.InvalidResponse(f"expected integer replies, got {replies[:3]!r}")
    return replies


def _bytes_view(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _host_port(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host.strip("[]"), int(port)

