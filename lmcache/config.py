"""Typed, validated configuration: one frozen object per component.

Validation lives here, not in the CLI, so every way of starting a server (the CLI, the
simulator, tests) gets the same checks and the same messages. A ``ConfigError`` names the
field; the CLI turns the field into its flag.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lmcache.protocol import AUTO_MODE, CPU_MODE_CHOICES

GIB = 1 << 30
MIN_L1_GB = 1 / (1 << 14)  # 64 KiB: a few chunks of a tiny model, enough for tests
MAX_L1_GB = float(1 << 20)  # one PiB: no machine has more, and sizes stay exact integers


class ConfigError(ValueError):
    """An invalid configuration value; ``field`` is the dataclass field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class EvictionPolicy(str, enum.Enum):
    LRU = "LRU"
    S3FIFO = "S3FIFO"
    ARC = "ARC"
    ARC_LONG = "ARC-LONG"
    LONG_2Q = "2Q-LONG"


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
class L2AdapterConfig:
    """One ``--l2-adapter`` JSON object: a tier under L1.

    - ``{"type": "disk", "path": DIR, "max_gb": N}``: chunk files in a local directory; its own
      evictor is LRU unless ``"eviction_policy"`` names another (as ``--eviction-policy``).
    - ``{"type": "redis", "url": "redis://host:6379/0"}``: one Redis (or Valkey) server, shared
      by every lmcache server that names it; ``rediss://`` and ``unix://`` URLs too.
    - ``{"type": "redis-cluster", "nodes": ["host:7000", ...]}``: a Redis Cluster, from one or
      more seed nodes.

    Redis options: ``namespace`` (keys of different namespaces never meet; default "default"),
    ``connections`` (per server, default 8) and ``timeout_ms`` (every call, default 1000).
    """

    type: str
    path: str = ""
    max_gb: float = 0.0
    url: str = ""
    nodes: tuple[str, ...] = ()
    namespace: str = "default"
    connections: int = 8
    timeout_ms: float = 1000.0
    eviction_policy: EvictionPolicy = EvictionPolicy.LRU  # the disk tier's own

    @property
    def max_bytes(self) -> int:
        return int(self.max_gb * GIB)

    @classmethod
    def parse(cls, text: str) -> L2AdapterConfig:
        """Parses and checks one flag value; raises ConfigError("l2_adapters", ...)."""
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise ConfigError("l2_adapters", f"is not valid JSON ({e}): {text!r}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise ConfigError("l2_adapters", f'must be a JSON object with a "type" (got {text!r})')
        kind = spec["type"]
        known = _L2_KEYS.get(kind)
        if known is None:
            raise ConfigError("l2_adapters", f"unknown type {kind!r} (known: {', '.join(_L2_KEYS)})")
        unknown = set(spec) - known
        if unknown:
            raise ConfigError("l2_adapters", f"{kind}: unknown key(s) {', '.join(sorted(unknown))} "
                                             f"(known: {', '.join(sorted(known - {'type'}))})")
        if kind == "disk":
            return cls._disk(spec)
        return cls._redis(kind, spec)

    @classmethod
    def _disk(cls, spec: dict[str, Any]) -> L2AdapterConfig:
        path, max_gb = spec.get("path"), spec.get("max_gb")
        if not isinstance(path, str) or not path:
            raise ConfigError("l2_adapters", 'disk: needs "path", a directory')
        if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not 0 < max_gb <= MAX_L1_GB:
            raise ConfigError("l2_adapters", f'disk: "max_gb" must be a size in GiB greater than 0 (got {max_gb!r})')
        try:
            policy = _enum(EvictionPolicy, "l2_adapters", spec.get("eviction_policy", EvictionPolicy.LRU))
        except ConfigError as e:
            raise ConfigError("l2_adapters", f'disk: "eviction_policy" {e.message}') from None
        config = cls("disk", path, float(max_gb), eviction_policy=policy)
        config._check_disk()
        return config

    @classmethod
    def _redis(cls, kind: str, spec: dict[str, Any]) -> L2AdapterConfig:
        url, nodes = spec.get("url", ""), spec.get("nodes", [])
        if kind == "redis-cluster" and url and not nodes:
            nodes = [url]  # one seed, as a URL
        if kind == "redis":
            if not isinstance(url, str) or urlsplit(url).scheme not in ("redis", "rediss", "unix"):
                raise ConfigError("l2_adapters", f'redis: needs "url", redis://host:port/db, rediss://... or unix://... (got {url!r})')
            _check_host_port(kind, url, needs_port=False)
        else:
            if isinstance(nodes, str) or not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
                raise ConfigError("l2_adapters", f'redis-cluster: needs "nodes", a list of "host:port" seeds (got {nodes!r})')
            nodes = [n.removeprefix("redis://").rstrip("/") for n in nodes]
            for node in nodes:
                _check_host_port(kind, f"redis://{node}", needs_port=True)
        namespace = spec.get("namespace", "default")
        if not isinstance(namespace, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", namespace):
            raise ConfigError("l2_adapters", f'{kind}: "namespace" must be 1 to 64 of A-Z a-z 0-9 . _ - (got {namespace!r})')
        connections = spec.get("connections", 8)
        if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 256:
            raise ConfigError("l2_adapters", f'{kind}: "connections" must be a whole number from 1 to 256 (got {connections!r})')
        timeout_ms = spec.get("timeout_ms", 1000)
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or not 1 <= timeout_ms <= 60_000:
            raise ConfigError("l2_adapters", f'{kind}: "timeout_ms" must be between 1 and 60000 (got {timeout_ms!r})')
        return cls(kind, url=url if kind == "redis" else "", nodes=tuple(nodes), namespace=namespace,
                   connections=connections, timeout_ms=float(timeout_ms))

    def as_dict(self) -> dict[str, Any]:
        """The flag's JSON again, without what the type does not use, and without a password."""
        if self.type == "disk":
            return {"type": "disk", "path": self.path, "max_gb": self.max_gb, "eviction_policy": self.eviction_policy.value}
        where: dict[str, Any] = {"url": redacted_url(self.url)} if self.type == "redis" else {"nodes": list(self.nodes)}
        return {"type": self.type, **where, "namespace": self.namespace, "connections": self.connections,
                "timeout_ms": self.timeout_ms}

    def _check_disk(self) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ConfigError("l2_adapters", f"disk: cannot create {self.path} ({e.strerror})") from None
        except ValueError as e:  # a name no filesystem takes (a NUL byte)
            raise ConfigError("l2_adapters", f"disk: {self.path!r} is not a usable path ({e})") from None
        if not os.path.isdir(self.path) or not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError("l2_adapters", f"disk: {self.path} is not a writable directory")
        fs = os.statvfs(self.path)
        if self.max_bytes > fs.f_blocks * fs.f_frsize:
            raise ConfigError(
                "l2_adapters",
                f"disk: max_gb {self.max_gb:g} is more than the filesystem of {self.path} holds "
                f"({fs.f_blocks * fs.f_frsize / GIB:.1f} GiB)",
            )



_L2_KEYS = {
    "disk": {"type", "path", "max_gb", "eviction_policy"},
    "redis": {"type", "url", "namespace", "connections", "timeout_ms"},
    "redis-cluster": {"type", "nodes", "url", "namespace", "connections", "timeout_ms"},
}


def _check_host_port(kind: str, url: str, needs_port: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or (needs_port and port is None):
        raise ConfigError("l2_adapters", f"{kind}: {redacted_url(url)!r} is not host:port")


def redacted_url(url: str) -> str:
    """A URL without its password (it goes to logs and /status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@dataclass(frozen=True)
class ServerConfig:
    """Everything `lmcache server` is started with; shown as-is by /status."""

    l1_size_gb: float
    host: str = "localhost"
    port: int = 5555
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    eviction_policy: EvictionPolicy = EvictionPolicy.LONG_2Q  # best on real traces; see storage/eviction.py
    max_workers: int = 1
    chunk_size: int = 256
    log_level: LogLevel = LogLevel.INFO
    # The L1 arena lives in a named POSIX SHM segment, so engines in lmcache_driven mode can map
    # it and copy pages into it themselves. Without it only engine_driven is served.
    l1_shm: bool = True
    # Locks (a store being written, a lookup's or retrieve's read lock) expire after this, so a
    # client that dies cannot pin memory.
    lock_ttl_s: float = 60.0
    # A registration with no store, retrieve or fence for this long is dropped (its engine is
    # taken for dead, and its SHM or GPU mappings are closed); a live engine that was only idle
    # registers again on its next request.
    engine_ttl_s: float = 600.0
    # A request frame above this gets an Error reply. Requests carry keys and block ids only
    # (a 1M-token prompt is 4096 keys, about 100 KiB), so 8 MiB is generous.
    max_message_bytes: int = 8 << 20
    # How GPU engines' pages cross PCIe: "staging" (device buffer + DMA) or "mapped" (the kernel
    # reaches pinned L1 directly). scripts/gpu_check.sh measures both.
    gpu_copy: str = "staging"
    # Bearer token that state-changing HTTP routes (/clear-cache) require; "" leaves them open.
    # Kept out of repr, and as_dict masks it, so /status and the logs never show it.
    admin_token: str = dataclasses.field(default="", repr=False)
    # CurveZMQ: the server's certificate file (public + secret key) encrypts the ZMQ port; a
    # directory of client public certificates, if given, is the only set of clients let in.
    curve_secret_key: str = ""
    curve_authorized_keys: str = ""
    # Tiers under L1, in lookup order (--l2-adapter, repeated): every chunk committed to L1 is
    # written through to each; a Lookup loads what follows the L1 hits from them.
    l2_adapters: tuple[L2AdapterConfig, ...] = ()
    # Chunks waiting to be written to L2, at most this many MiB; more stay L1-only (counted).
    l2_write_queue_mb: float = 1024.0
    # How long a Lookup waits for chunks loading from L2 before it answers with what is in L1.
    l2_prefetch_deadline_ms: float = 50.0
    # What each cache salt (tenant) may hold in L1 unless its own quota says otherwise (PUT
    # /quota/{salt}); 0: no limit.
    default_quota_gb: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # every number below is also checked for its range
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f.name, f"must be a finite number (got {value:g})")
        object.__setattr__(self, "host", strip_scheme(self.host))
        object.__setattr__(self, "eviction_policy", _enum(EvictionPolicy, "eviction_policy", self.eviction_policy))
        object.__setattr__(self, "log_level", _enum(LogLevel, "log_level", self.log_level))
        if not MIN_L1_GB <= self.l1_size_gb <= MAX_L1_GB:  # also refuses nan and inf
            raise ConfigError(
                "l1_size_gb", f"must be between 64 KiB ({MIN_L1_GB:g}) and {MAX_L1_GB:.0f} GiB (got {self.l1_size_gb:g})"
            )
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
        if not self.engine_ttl_s > 0:
            raise ConfigError("engine_ttl_s", f"must be greater than 0 (got {self.engine_ttl_s:g})")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes", f"must be at least 1024 (got {self.max_message_bytes})")
        for field in ("host", "http_host"):
            if not getattr(self, field):
                raise ConfigError(field, "must not be empty")
        if not self.l2_write_queue_mb > 0:
            raise ConfigError("l2_write_queue_mb", f"must be greater than 0 (got {self.l2_write_queue_mb:g})")
        if not 0 <= self.l2_prefetch_deadline_ms <= 60_000:
            raise ConfigError("l2_prefetch_deadline_ms", f"must be between 0 and 60000 (got {self.l2_prefetch_deadline_ms:g})")
        if not 0 <= self.default_quota_gb <= MAX_L1_GB:
            raise ConfigError("default_quota_gb", f"must be 0 (no limit) or a size in GiB (got {self.default_quota_gb:g})")
        adapters = tuple(a if isinstance(a, L2AdapterConfig) else L2AdapterConfig.parse(a) for a in self.l2_adapters)
        paths = [os.path.realpath(a.path) for a in adapters if a.type == "disk"]
        if len(set(paths)) != len(paths):
            raise ConfigError("l2_adapters", "two disk tiers name the same directory")
        object.__setattr__(self, "l2_adapters", adapters)
        if self.gpu_copy not in ("staging", "mapped"):
            raise ConfigError("gpu_copy", f"must be staging or mapped (got {self.gpu_copy!r})")
        self._check_access_control()

    def _check_access_control(self) -> None:
        # Imported here: it pulls in zmq, which `lmcache --help` and plain configs do not need.
        from lmcache.security import check_token, load_authorized_keys, load_keypair

        if (why := check_token(self.admin_token)) is not None:
            raise ConfigError("admin_token", why)  # the message never quotes the token
        if self.curve_authorized_keys and not self.curve_secret_key:
            raise ConfigError("curve_authorized_keys", "needs --curve-secret-key (the server's own key pair)")
        _check_keys(self, curve_secret_key=load_keypair, curve_authorized_keys=load_authorized_keys)

    @property
    def l1_size_bytes(self) -> int:
        return int(self.l1_size_gb * GIB)

    @property
    def endpoint(self) -> str:
        return zmq_endpoint(self.host, self.port)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, for /status and the start-up log; secrets are masked."""
        from lmcache.security import mask_secret

        values = {
            f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v)
            for f in dataclasses.fields(self)
        }
        values["admin_token"] = mask_secret(self.admin_token)
        values["l2_adapters"] = [a.as_dict() for a in self.l2_adapters]
        return values


def _check_keys(config: Any, **loaders: Callable[[Any], object]) -> None:
    """Each named field that is set must load with its loader; a KeyFileError names the field."""
    from lmcache.security import KeyFileError

    for field, load in loaders.items():
        value = getattr(config, field)
        if value:
            try:
                load(value)
            except KeyFileError as e:
                raise ConfigError(field, str(e)) from None


def _enum(kind: type[enum.Enum], field: str, value: Any) -> Any:
    if isinstance(value, kind):
        return value
    for member in kind:
        if str(value).lower() == member.value.lower():
            return member
    choices = ", ".join(m.value for m in kind)
    raise ConfigError(field, f"must be one of {choices} (got {value!r})")


@dataclass(frozen=True)
class ConnectorConfig:
    """The vLLM connector's settings, read from ``kv_connector_extra_config`` (keys ``lmcache.mp.*``)."""

    host: str = "tcp://localhost"
    port: int = 5555
    mp_transfer_mode: str = AUTO_MODE  # one of CPU_MODE_CHOICES
    save_decode_cache: bool = False
    # Longest time get_num_new_matched_tokens waits for a lookup before answering "not known yet".
    lookup_wait_ms: float = 2.0
    # Every request to the server gives up after this; a dead server never stalls vLLM longer.
    timeout_s: float = 5.0
    # How often a worker that is not registered (server down at start, or restarted) tries again.
    retry_interval_s: float = 5.0
    # CurveZMQ, for a server started with --curve-secret-key: its public key (z85 text or the
    # path of its .key file), and this client's own certificate (.key_secret) when the server
    # only lets in listed clients. Without the latter a throwaway key pair is made per client.
    curve_server_key: str = ""
    curve_client_secret_file: str = ""

    KEYS = {
        "lmcache.mp.host": "host",
        "lmcache.mp.port": "port",
        "lmcache.mp.mp_transfer_mode": "mp_transfer_mode",
        "lmcache.mp.save_decode_cache": "save_decode_cache",
        "lmcache.mp.lookup_wait_ms": "lookup_wait_ms",
        "lmcache.mp.timeout_s": "timeout_s",
        "lmcache.mp.retry_interval_s": "retry_interval_s",
        "lmcache.mp.curve_server_key": "curve_server_key",
        "lmcache.mp.curve_client_secret_file": "curve_client_secret_file",
    }

    def __post_init__(self) -> None:
        if self.mp_transfer_mode not in CPU_MODE_CHOICES:
            choices = ", ".join(CPU_MODE_CHOICES)
            raise ConfigError("mp_transfer_mode", f"must be one of {choices} (got {self.mp_transfer_mode!r})")
        if not 1 <= int(self.port) <= 65535:
            raise ConfigError("port", f"must be a TCP port (got {self.port})")
        if self.timeout_s <= 0 or self.lookup_wait_ms < 0 or self.retry_interval_s <= 0:
            raise ConfigError("timeout_s", "timeouts must be positive")
        if self.curve_server_key or self.curve_client_secret_file:
            self._check_curve()

    def _check_curve(self) -> None:
        # A bad key fails vLLM's start-up with a clear message rather than every request later.
        from lmcache.security import load_keypair, server_public_key

        if not self.curve_server_key:
            raise ConfigError("curve_client_secret_file", "needs lmcache.mp.curve_server_key (the server's public key)")
        _check_keys(self, curve_server_key=server_public_key, curve_client_secret_file=load_keypair)

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        values: dict[str, Any] = {}
        for key, value in (extra or {}).items():
            if key in cls.KEYS:
                field = cls.KEYS[key]
                default = getattr(cls, field)
                if isinstance(default, bool):
                    value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                values[field] = type(default)(value)
        return cls(**values)
