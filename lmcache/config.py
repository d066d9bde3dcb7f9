"""Typed, validated configuration: one frozen object per component.

Validation lives here, not in the CLI, so every way of starting a server (the CLI, the
simulator, tests) gets the same checks and the same messages. A ``ConfigError`` names the
field; the CLI turns the field into its flag.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30


class ConfigError(ValueError):
    """An invalid configuration value; ``field`` is the dataclass field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class EvictionPolicy(str, enum.Enum):
    LRU = "LRU"


class LogLevel(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def strip_scheme(host: str) -> str:
    """Accepts ``tcp://host`` as well as ``host`` (vLLM's config uses the former)."""
    return host[len("tcp://") :] if host.startswith("tcp://") else host


def zmq_endpoint(host: str, port: int) -> str:
    return f"tcp://{strip_scheme(host)}:{port}"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `lmcache server` is started with; shown as-is by /status."""

    l1_size_gb: float
    host: str = "localhost"
    port: int = 5555
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    eviction_policy: EvictionPolicy = EvictionPolicy.LRU
    max_workers: int = 1
    chunk_size: int = 256
    log_level: LogLevel = LogLevel.INFO
    # The L1 arena lives in a named POSIX SHM segment, so engines in lmcache_driven mode can map
    # it and copy pages into it themselves. Without it only engine_driven is served.
    l1_shm: bool = True
    # Locks (a store being written, a lookup's or retrieve's read lock) expire after this, so a
    # client that dies cannot pin memory.
    lock_ttl_s: float = 60.0
    # A request frame above this gets an Error reply. Requests carry keys and block ids only
    # (a 1M-token prompt is 4096 keys, about 100 KiB), so 8 MiB is generous.
    max_message_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", strip_scheme(self.host))
        object.__setattr__(self, "eviction_policy", _enum(EvictionPolicy, "eviction_policy", self.eviction_policy))
        object.__setattr__(self, "log_level", _enum(LogLevel, "log_level", self.log_level))
        if not self.l1_size_gb > 0:
            raise ConfigError("l1_size_gb", f"must be greater than 0 (got {self.l1_size_gb:g})")
        for field in ("port", "http_port"):
            value = getattr(self, field)
            if not 1 <= value <= 65535:
                raise ConfigError(field, f"must be a TCP port between 1 and 65535 (got {value})")
        if self.port == self.http_port:
            raise ConfigError("http_port", f"must differ from --port (both are {self.port})")
        if not 1 <= self.max_workers <= 256:
            raise ConfigError("max_workers", f"must be between 1 and 256 (got {self.max_workers})")
        if not 1 <= self.chunk_size <= 1 << 20:
            raise ConfigError("chunk_size", f"must be between 1 and 1048576 tokens (got {self.chunk_size})")
        if not self.lock_ttl_s > 0:
            raise ConfigError("lock_ttl_s", f"must be greater than 0 (got {self.lock_ttl_s:g})")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes", f"must be at least 1024 (got {self.max_message_bytes})")
        for field in ("host", "http_host"):
            if not getattr(self, field):
                raise ConfigError(field, "must not be empty")

    @property
    def l1_size_bytes(self) -> int:
        return int(self.l1_size_gb * GIB)

    @property
    def endpoint(self) -> str:
        return zmq_endpoint(self.host, self.port)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, for /status and the start-up log."""
        return {
            f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v)
            for f in dataclasses.fields(self)
        }


def _enum(kind: type[enum.Enum], field: str, value: Any) -> Any:
    if isinstance(value, kind):
        return value
    for member in kind:
        if str(value).lower() == member.value.lower():
            return member
    choices = ", ".join(m.value for m in kind)
    raise ConfigError(field, f"must be one of {choices} (got {value!r})")
