"""CacheEngine: the one home of cache semantics.

The ZMQ loop and the HTTP app are thin faces that call these methods; nothing else decides
what is cached. This first version knows its configuration and lifecycle; the L1 store,
lookups and transfers are added behind the same methods.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from typing import Any

from lmcache import __version__
from lmcache.config import ServerConfig
from lmcache.log import init_logger

logger = init_logger(__name__)


class EngineState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


class CacheEngine:
    """Owns the cache; safe to call from the ZMQ thread, worker threads and the HTTP loop."""

    # Transfer modes this server can serve; the transfer paths extend this list.
    TRANSFER_MODES: tuple[str, ...] = ()

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server_id = uuid.uuid4().hex
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._state = EngineState.STARTING
        # instance id -> registration facts; session id -> per-request state. Filled by the
        # registration and lookup paths; reported by status() already so the shape is stable.
        self._engines: dict[str, dict[str, Any]] = {}
        self._sessions: dict[str, dict[str, Any]] = {}
        self._clears = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            assert self._state is EngineState.STARTING, self._state
            self._state = EngineState.READY

    def close(self) -> None:
        """Releases everything the engine holds; idempotent."""
        with self._lock:
            self._state = EngineState.STOPPED
            self._engines.clear()
            self._sessions.clear()

    def begin_shutdown(self) -> None:
        with self._lock:
            if self._state is EngineState.READY:
                self._state = EngineState.STOPPING

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): what /healthcheck reports."""
        state = self._state
        if state is EngineState.READY:
            return True, "ready"
        return False, f"engine is {state.value}"

    # --- admin ----------------------------------------------------------------------------

    def clear(self) -> int:
        """Drops every cached object, locked ones too; returns how many were dropped."""
        with self._lock:
            self._clears += 1
        logger.info("Cleared the L1 cache (0 objects)")
        return 0

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for /status, the Status message and /metrics."""
        capacity = self.config.l1_size_bytes
        with self._lock:
            return {
                "server": {
                    "version": __version__,
                    "server_id": self.server_id,
                    "state": self._state.value,
                    "uptime_seconds": round(time.monotonic() - self._started, 3),
                    "transfer_modes": list(self.TRANSFER_MODES),
                },
                "l1": {
                    "capacity_bytes": capacity,
                    "used_bytes": 0,
                    "free_bytes": capacity,
                    "objects": 0,
                    "eviction_policy": self.config.eviction_policy.value,
                    "clears": self._clears,
                },
                "engines": [dict(e) for e in self._engines.values()],
                "sessions": {"active": len(self._sessions)},
                "config": self.config.as_dict(),
            }
