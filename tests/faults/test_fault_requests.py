"""Every request type of protocol.Request, well-typed but with hostile values: huge, negative and
boundary integers, 10 KB and control-character strings, byte strings that are not whole hashes,
100k hashes, very long lists. Each is encoded as a real client would (protocol.encode) and sent
from a raw DEALER socket. Each must be answered within 2 s with its own reply type or an Error
that is not "internal" (an internal error is a server bug), and the server must stay healthy.

The server runs with a capped address space (fault_support.start_server), so a request that
makes it allocate without bound fails inside it rather than exhausting the test machine.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fault_support import (
    FORGED, REPLY_DEADLINE_S, LiveServer, Problems, RawDealer, decode_reply_frames, forged_lines, fuzz_settings,
    line_count, short_repr, sync_output,
)
from lmcache import __version__
from lmcache import protocol as p
from lmcache.client import MPClient
from lmcache.kv_transfer import KVTransfer, register_kv_caches
from lmcache.keys import CacheScope
from lmcache.server.process import ServerProcess
from lmcache.protocol import CudaIpcStorage
from lmcache.page_layout import LayerPages, PageLayout

ENGINE_VICTIM = "fault-victim-engine"  # engine_driven: Store, Retrieve, Fence reach the copy code
LMCACHE_VICTIM = "fault-victim-lmcache"  # lmcache_driven: PrepareStore, PrepareRetrieve, tickets
BIG = 100_000
MAX_MESSAGE_BYTES = 8 << 20  # the server's default --max-message-bytes
# Frames past this are refused by libzmq (the sender is disconnected), not answered.
HARD_FRAME_LIMIT = 2 * MAX_MESSAGE_BYTES

REPLY_TO: dict[type, tuple[type, ...]] = {
    p.Hello: (p.HelloReply,), p.Ping: (p.Pong,), p.Status: (p.StatusReply,), p.Clear: (p.ClearReply,),
    p.Lookup: (p.LookupReply,), p.ReleaseLocks: (p.Released,), p.EndSession: (p.Released,),
    p.RegisterKVCache: (p.Registered,), p.UnregisterKVCache: (p.Unregistered,), p.Store: (p.StoreReply,),
    p.Retrieve: (p.RetrieveReply,), p.PrepareStore: (p.Slots,), p.CommitStore: (p.StoreReply,),
    p.PrepareRetrieve: (p.Slots,), p.FinishRetrieve: (p.Released,), p.Fence: (p.Fenced,),
}

# Values past int64 are listed three times: they are what numpy and C code choke on, and each
# request type gets only a few dozen examples.
HOSTILE_INTS = [0, 1, -1, -16, 15, 2**31 - 1, 2**31, 2**32, 2**40, 2**48, 2**53 + 1, 2**63 - 1, -(2**31),
                *[2**63, 2**64 - 1, -(2**63)] * 3]
HOSTILE_STRS = [
    "", "x" * 10_000, "a\nb", "\n" + FORGED, FORGED + "\n", "\r" + FORGED, "naïve ☃ 中文 🚀 \u202e", "\x00", "\x1b[31mred",
    "../../etc/passwd", "/dev/shm/lmcache_l1_1", "/lmcache_kv_0_1", "%s%n%x", "{0}{1}", "\\", ENGINE_VICTIM,
    LMCACHE_VICTIM, "fault-model", "engine_driven", "lmcache_driven", "cuda_ipc", "bfloat16", "NHC", "KNHC",
]
_ONE_HASH = bytes(range(16))
HOSTILE_BYTES = [
    b"", b"\x00", b"x" * 15, b"x" * 17, b"x" * 31, _ONE_HASH, _ONE_HASH * 3, b"\xff" * 64, os.urandom(64),
    _ONE_HASH * BIG,  # 100k copies of one hash
    os.urandom(16 * BIG),  # 100k distinct hashes
    os.urandom(16 * BIG + 5),
]


# --- hostile values, by msgspec type ----------------------------------------------------------


def _int_edges(t: mi.IntType) -> list[int]:
    """The type's own bounds and one past them: where the checks after decoding get exercised."""
    edges = []
    for bound, inside, outside in ((t.ge, 0, -1), (t.gt, 1, 0), (t.le, 0, 1), (t.lt, -1, 0)):
        if bound is not None:
            edges += [bound + inside, bound + outside]
    return [e for e in edges if -(2**63) <= e <= 2**64 - 1]


LONG_LIST_BYTES = 24 << 20  # a long list's encoded size stays under this (then: fewer items)


def _long_list(item: Any, n: int) -> list[Any]:
    """``n`` copies of ``item``, or as many as fit LONG_LIST_BYTES encoded: 100k copies of a
    1.6 MB value would be 160 GB."""
    size = len(msgspec.msgpack.encode(item))
    return [item] * min(n, max(1, LONG_LIST_BYTES // max(size, 1)))


def hostile(t: mi.Type, base: Any = msgspec.UNSET, keep: bool = True) -> st.SearchStrategy[Any]:
    """Values of type ``t``, mostly hostile. ``base`` is a valid value, if known: nested structs
    mutate a few of its fields, and with ``keep`` it is itself drawn now and then."""
    kept = [st.just(base)] if keep and base is not msgspec.UNSET else []
    if isinstance(t, mi.IntType):
        extremes = st.sampled_from(HOSTILE_INTS + _int_edges(t))
        return st.one_of(*kept, extremes, extremes, extremes, st.integers(-(2**63), 2**64 - 1))
    if isinstance(t, mi.FloatType):  # a deadline: NaN, infinities, past and far future
        edges = [b + d for b in (t.ge, t.gt, t.le, t.lt) if b is not None for d in (-1e-9, 0.0, 1e-9)]
        floats = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-300, 1.0, 1e300, *edges])
        return st.one_of(*kept, floats, st.floats(allow_nan=True, allow_infinity=True))
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.StrType):
        edge = [("y" * t.max_length), ("y" * (t.max_length + 1))] if t.max_length else []
        return st.one_of(*kept, st.sampled_from(HOSTILE_STRS + edge))
    if isinstance(t, mi.BytesType):
        edge = [b"h" * t.max_length, b"h" * (t.max_length + 16)] if t.max_length and t.max_length < 1 << 24 else []
        return st.one_of(*kept, st.sampled_from(HOSTILE_BYTES + edge))
    if isinstance(t, mi.ListType):
        sample = base[0] if isinstance(base, list) and base else msgspec.UNSET
        item = hostile(t.item_type, sample, keep=False)
        lengths = [BIG] + ([t.max_length, t.max_length + 1] if t.max_length else [])
        return st.one_of(
            *kept,
            st.just([]),
            st.lists(item, min_size=1, max_size=4),
            st.builds(_long_list, item, st.integers(1, 8)),  # n copies: the whole list is hostile
            st.builds(_long_list, item, st.sampled_from(lengths)),
        )
    if isinstance(t, mi.StructType):
        return _hostile_struct(t, base)
    if isinstance(t, mi.EnumType):
        return st.sampled_from(list(t.cls))
    if isinstance(t, (mi.AnyType, mi.DictType)):
        return st.one_of(st.none(), st.just({}), st.sampled_from(HOSTILE_STRS))
    raise NotImplementedError(f"no hostile values for {t!r}: extend tests/faults/test_fault_requests.py")


def _field_base(f: mi.Field, base: Any) -> Any:
    if base is not msgspec.UNSET:
        return getattr(base, f.name)
    if f.default is not msgspec.NODEFAULT:
        return f.default
    if f.default_factory is not msgspec.NODEFAULT:
        return f.default_factory()
    return msgspec.UNSET


@st.composite
def _hostile_struct(draw: st.DrawFn, t: mi.StructType, base: Any) -> Any:
    """A struct with one to three fields made hostile and the rest as in ``base`` (so that the
    hostile value gets past the checks of its neighbours and deep into the server); every
    field is hostile when there is no base."""
    bases = {f.name: _field_base(f, base) for f in t.fields}
    names = [f.name for f in t.fields]
    chosen = set(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3))) if names else set()
    values = {}
    for f in t.fields:
        if f.name in chosen or bases[f.name] is msgspec.UNSET:
            values[f.name] = draw(hostile(f.type, bases[f.name], keep=False))
        else:
            values[f.name] = bases[f.name]
    return t.cls(**values)


# --- the server with its victims -------------------------------------------------------------


@dataclass
class Victims:
    """Two registered engines the hostile requests can reach deep into: one engine_driven (the
    server copies pages), one lmcache_driven (tickets, arena offsets)."""

    client: MPClient
    engine: KVTransfer
    lmcache: KVTransfer
    kv: list[Any]

    @classmethod
    def register(cls, server: ServerProcess) -> Victims:
        from lmcache.testing.vllm_like import make_kv

        client = MPClient("127.0.0.1", server.port, timeout_s=10)
        kv = [*make_kv("LBHNC", "bfloat16"), *make_kv("LBNHC", "bfloat16")]
        victims = cls(client, None, None, kv)  # type: ignore[arg-type]
        victims.refresh()
        return victims

    def refresh(self) -> None:
        """(Re-)registers both: a hostile Register or Unregister may have replaced or dropped them."""
        self.engine = register_kv_caches(self.client, 
            self.kv[:2], model="fault-model", instance_id=ENGINE_VICTIM, mode="engine_driven")
        self.lmcache = register_kv_caches(self.client, 
            self.kv[2:], model="fault-model", instance_id=LMCACHE_VICTIM, mode="lmcache_driven")

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer(address_space_gb=6, prepare=Victims.register)
    yield server
    server.close()


def base_requests(v: Victims) -> list[p.Request]:
    """One plausible request of each type (Clear aside: it has no fields to make hostile)."""
    hashes = _ONE_HASH
    layout = v.lmcache.layout
    return [
        p.Hello(__version__, "fault-requests"),
        p.Ping(),
        p.Status(),
        p.Lookup(v.engine.scope(), hashes),
        p.ReleaseLocks("fault-session", hashes),
        p.EndSession("fault-session"),
        _registration(LMCACHE_VICTIM, layout),
        p.UnregisterKVCache("fault-nobody"),
        p.Store(ENGINE_VICTIM, hashes, [0, 1, 2, 3]),
        p.Retrieve(ENGINE_VICTIM, hashes, [4, 5, 6, 7]),
        p.PrepareStore(LMCACHE_VICTIM, hashes),
        p.CommitStore(1, [True]),
        p.PrepareRetrieve(LMCACHE_VICTIM, hashes),
        p.FinishRetrieve(1),
        p.Fence(ENGINE_VICTIM),
    ]


def _registration(instance_id: str, layout: PageLayout, **changes: Any) -> p.RegisterKVCache:
    fields = {f.name for f in mi.type_info(p.RegisterKVCache).fields}
    extra = {}
    if "liveness" in fields:  # lmcache_driven engines name a liveness mark they hold (newer protocol)
        from lmcache.transfer.liveness import process_mark

        extra["liveness"] = process_mark()
    request = p.RegisterKVCache(instance_id, "fault-model", 1, 0, layout, [], "lmcache_driven", **extra)
    return msgspec.structs.replace(request, **changes)


def check_request(sock: RawDealer, request: p.Request, request_id: bytes, must_refuse: bool = False) -> str | None:
    """Sends one request; what is wrong with its reply, or None. With ``must_refuse`` the
    request's values are invalid: only an Error (not an internal one) is a right answer."""
    try:
        frame = p.encode(request)
    except (msgspec.EncodeError, OverflowError) as e:
        return f"cannot even be encoded here ({e}): the test generated an impossible value"
    # Past the hard limit libzmq drops the connection instead of answering: no use waiting long.
    oversized = len(frame) > HARD_FRAME_LIMIT
    deadline = time.monotonic() + (0.3 if oversized else REPLY_DEADLINE_S)
    sock.send([request_id, frame])
    while True:
        reply = sock.recv(max(0.0, deadline - time.monotonic()))
        if reply is None:
            # documented: libzmq drops the connection of a peer sending an oversized frame
            return None if oversized else f"no reply within {REPLY_DEADLINE_S} s"
        got_id, decoded = decode_reply_frames(reply)
        if got_id == request_id:
            break
        # a late reply to an earlier request (already reported as late): skip it
    if isinstance(decoded, p.Error):
        if decoded.code is p.ErrorCode.INTERNAL:
            return f"INTERNAL error: {decoded.message[:500]}"
        return None
    if not isinstance(decoded, REPLY_TO[type(request)]):
        return f"a {type(decoded).__name__} reply to a {type(request).__name__}"
    if must_refuse:
        return f"accepted (answered {short_repr(decoded)}) although its values are invalid"
    return None


def _run_one(live: LiveServer, request: p.Request, problems: Problems, request_id: bytes = b"hostile",
             must_refuse: bool = False) -> None:
    first_line = line_count(live.server)
    with RawDealer(live.port) as sock:
        symptom = check_request(sock, request, request_id, must_refuse)
    what = short_repr(request)
    if symptom is not None:
        problems.add(what, symptom)
    problems.check_server(live, what, first_line)


class Prober:
    """One socket for a whole fuzz run (a new one when the server is replaced); the full
    serving check runs after any bad reply and every CHECK_EVERY requests (it costs a fresh
    client and an HTTP request: most of a run's time otherwise)."""

    CHECK_EVERY = 10

    def __init__(self, live: LiveServer, problems: Problems) -> None:
        self.live, self.problems = live, problems
        self.sock: RawDealer | None = None
        self.server: ServerProcess | None = None
        self.first_line = 0
        self.ids = itertools.count()
        self.recent: list[str] = []

    def probe(self, request: p.Request) -> None:
        if self.server is not self.live.server:
            self.close()
            self.server, self.sock = self.live.server, RawDealer(self.live.port)
            self.first_line = line_count(self.server)
        assert self.sock is not None
        number = next(self.ids)
        what = short_repr(request)
        self.recent = [*self.recent[-(self.CHECK_EVERY - 1):], what]
        symptom = check_request(self.sock, request, number.to_bytes(4, "big"))
        if symptom is not None:
            self.problems.add(what, symptom)
        if symptom is not None or number % self.CHECK_EVERY == self.CHECK_EVERY - 1:
            # A silent breakage is blamed on the requests since the last check.
            blamed = what if symptom is not None else "one of: " + " | ".join(self.recent)
            self.problems.check_server(self.live, blamed, self.first_line)
            self.recent = []

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def test_every_request_type_is_covered() -> None:
    """A request type added to the protocol must be added here too, or it escapes the fuzzing."""
    assert set(REPLY_TO) == set(p.Request.__args__)


# Every request type with fields (Clear, Ping and Status have none), each fuzzed on its own so
# that each gets its share of examples and its own verdict.
FUZZED = [cls for cls in REPLY_TO if mi.type_info(cls).fields]
# More examples where more fields (and nested structs) reach deep code.
EXAMPLES = {p.RegisterKVCache: 300, p.Store: 200, p.Retrieve: 200, p.Lookup: 150, p.CommitStore: 60}


@pytest.mark.parametrize("kind", FUZZED, ids=lambda cls: cls.__name__)
def test_hostile_values(live: LiveServer, kind: type) -> None:
    problems = Problems()
    live.state.refresh()
    server_at_start, first_line = live.server, line_count(live.server)
    prober = Prober(live, problems)

    @fuzz_settings(max_examples=EXAMPLES.get(kind, 40))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        if problems.gave_up:
            return
        base = next(r for r in base_requests(live.state) if type(r) is kind)
        prober.probe(data.draw(hostile(mi.type_info(kind), base)))

    try:
        run()
    finally:
        prober.close()
    problems.check_server(live, "the last requests: " + " | ".join(prober.recent), first_line)
    forged = forged_lines(live.server, first_line if live.server is server_at_start else 0)
    if forged:
        problems.add(f"a hostile string in a {kind.__name__}", f"forged server output lines: {forged[:3]}")
    assert not problems, problems.report()


def _layout(v: Victims, **changes: Any) -> PageLayout:
    return msgspec.structs.replace(v.lmcache.layout, **changes)


def _layer(v: Victims) -> LayerPages:
    return v.lmcache.layout.layers[0]


# Named cases: each a function of the victims (for their real layouts and scopes).
CASES: dict[str, Any] = {
    "Lookup all_ranks world_size=2**40": lambda v: p.Lookup(CacheScope("fault-model", 2**40, 0), _ONE_HASH, True),
    "Lookup all_ranks world_size=2**40 with a page format": lambda v: p.Lookup(
        CacheScope("fault-model", 2**40, 0, v.engine.page_format), _ONE_HASH, True),
    "Lookup all_ranks world_size=2**31 locking": lambda v: p.Lookup(
        CacheScope("fault-model", 2**31, 0, v.engine.page_format), _ONE_HASH, True, True, "s"),
    "Lookup world_size=0": lambda v: p.Lookup(CacheScope("fault-model", 0, 0), _ONE_HASH),
    "Lookup rank=-1": lambda v: p.Lookup(CacheScope("fault-model", 1, -1), _ONE_HASH),
    "Lookup rank=2**63": lambda v: p.Lookup(CacheScope("fault-model", 2**64 - 1, 2**63), _ONE_HASH),
    "Lookup 100k distinct hashes": lambda v: p.Lookup(v.engine.scope(), HOSTILE_BYTES[-2]),
    "Lookup 100k copies of one hash, locking": lambda v: p.Lookup(v.engine.scope(), _ONE_HASH * BIG, False, True, "s"),
    "Lookup 15-byte hashes": lambda v: p.Lookup(v.engine.scope(), b"x" * 15),
    "Lookup 10 KB model and salt": lambda v: p.Lookup(CacheScope("m" * 10_000, 1, 0, "", "s" * 10_000), _ONE_HASH),
    "ReleaseLocks 17-byte hashes": lambda v: p.ReleaseLocks("s", b"x" * 17),
    "ReleaseLocks 100k hashes": lambda v: p.ReleaseLocks("s", HOSTILE_BYTES[-2]),
    "EndSession 10 KB session": lambda v: p.EndSession("s" * 10_000),
    "RegisterKVCache block_size=0": lambda v: _registration(LMCACHE_VICTIM, _layout(v, block_size=0)),
    "RegisterKVCache block_size=-16": lambda v: _registration(LMCACHE_VICTIM, _layout(v, block_size=-16)),
    "RegisterKVCache block_size=2**63": lambda v: _registration(LMCACHE_VICTIM, _layout(v, block_size=2**63)),
    "RegisterKVCache 100k layers": lambda v: _registration(LMCACHE_VICTIM, _layout(v, layers=[_layer(v)] * BIG)),
    "RegisterKVCache no layers": lambda v: _registration(LMCACHE_VICTIM, _layout(v, layers=[])),
    "RegisterKVCache num_blocks=2**63-1": lambda v: _registration(LMCACHE_VICTIM, _layout(v, num_blocks=2**63 - 1)),
    "RegisterKVCache num_blocks=0": lambda v: _registration(LMCACHE_VICTIM, _layout(v, num_blocks=0)),
    "RegisterKVCache page_bytes=0": lambda v: _registration(LMCACHE_VICTIM, _layout(v, page_bytes=0)),
    "RegisterKVCache page_bytes=2**62": lambda v: _registration(LMCACHE_VICTIM, _layout(v, page_bytes=2**62)),
    "RegisterKVCache parts=3": lambda v: _registration(LMCACHE_VICTIM, _layout(v, parts=3)),
    "RegisterKVCache storage_bytes=[2**64-1]": lambda v: _registration(
        LMCACHE_VICTIM, _layout(v, storage_bytes=[2**64 - 1])),
    "RegisterKVCache layer storage=-1": lambda v: _registration(
        LMCACHE_VICTIM, _layout(v, layers=[LayerPages(-1, 0, 512, 0)] * 2)),
    "RegisterKVCache layer strides 2**62": lambda v: _registration(
        LMCACHE_VICTIM, _layout(v, layers=[LayerPages(0, 2**62, 2**62, 2**62)] * 2)),
    "RegisterKVCache dtype forged": lambda v: _registration(LMCACHE_VICTIM, _layout(v, dtype=FORGED)),
    "RegisterKVCache inner 10 KB": lambda v: _registration(LMCACHE_VICTIM, _layout(v, inner="N" * 10_000)),
    "RegisterKVCache world_size=2**40": lambda v: _registration(LMCACHE_VICTIM, v.lmcache.layout, world_size=2**40),
    "RegisterKVCache rank=-1": lambda v: _registration(LMCACHE_VICTIM, v.lmcache.layout, rank=-1),
    "RegisterKVCache engine_driven, 100k segments": lambda v: _registration(
        "fault-new", v.engine.layout, mode="engine_driven", segments=["/lmcache_kv_0_1"] * BIG),
    "RegisterKVCache engine_driven, segment ../../etc/passwd": lambda v: _registration(
        "fault-new", v.engine.layout, mode="engine_driven", segments=["../../etc/passwd"]),
    "RegisterKVCache cuda_ipc, bogus handle": lambda v: _registration(
        "fault-new", v.engine.layout, mode="cuda_ipc", cuda=[CudaIpcStorage("0" * 32, b"\x00" * 64, -1, 2**63)]),
    "RegisterKVCache unknown mode": lambda v: _registration("fault-new", v.engine.layout, mode="x" * 10_000),
    "RegisterKVCache instance id with a forged line": lambda v: _registration("\n" + FORGED, v.lmcache.layout),
    "Store block ids 2**63": lambda v: p.Store(ENGINE_VICTIM, _ONE_HASH, [2**63] * 4),
    "Store block ids 2**64-1": lambda v: p.Store(ENGINE_VICTIM, _ONE_HASH, [2**64 - 1] * 4),
    "Store block ids -2**63": lambda v: p.Store(ENGINE_VICTIM, _ONE_HASH, [-(2**63)] * 4),
    "Store 100k copies of one hash over valid blocks": lambda v: p.Store(ENGINE_VICTIM, _ONE_HASH * BIG, [0] * (4 * BIG)),
    "Store 400k block ids for one hash": lambda v: p.Store(ENGINE_VICTIM, _ONE_HASH, [0] * (4 * BIG)),
    "Store 17-byte hashes": lambda v: p.Store(ENGINE_VICTIM, b"x" * 17, [0, 1, 2, 3]),
    "Store bogus CUDA event": lambda v: p.Store(ENGINE_VICTIM, _ONE_HASH, [0, 1, 2, 3], event=b"\x00" * 64),
    "Store odd-length CUDA event": lambda v: p.Store(ENGINE_VICTIM, _ONE_HASH, [0, 1, 2, 3], event=b"\x00" * 63),
    "Retrieve block ids 2**63": lambda v: p.Retrieve(ENGINE_VICTIM, _ONE_HASH, [2**63] * 4),
    "Retrieve skip_blocks=-1": lambda v: p.Retrieve(ENGINE_VICTIM, _ONE_HASH, [0, 1, 2, 3], skip_blocks=-1),
    "Retrieve skip_blocks=2**63": lambda v: p.Retrieve(ENGINE_VICTIM, _ONE_HASH, [0, 1, 2, 3], skip_blocks=2**63),
    "Retrieve skip_blocks=2**64-1": lambda v: p.Retrieve(ENGINE_VICTIM, _ONE_HASH, [0, 1, 2, 3], skip_blocks=2**64 - 1),
    "Retrieve from an lmcache_driven engine": lambda v: p.Retrieve(LMCACHE_VICTIM, _ONE_HASH, [0, 1, 2, 3]),
    "PrepareStore 100k distinct hashes": lambda v: p.PrepareStore(LMCACHE_VICTIM, HOSTILE_BYTES[-2]),
    "PrepareStore on an engine_driven engine": lambda v: p.PrepareStore(ENGINE_VICTIM, _ONE_HASH),
    "PrepareRetrieve 100k copies of one hash": lambda v: p.PrepareRetrieve(LMCACHE_VICTIM, _ONE_HASH * BIG),
    "CommitStore ticket=2**63": lambda v: p.CommitStore(2**63, [True]),
    "CommitStore ticket=-1": lambda v: p.CommitStore(-1, [True]),
    "CommitStore 100k results": lambda v: p.CommitStore(1, [True] * BIG),
    "FinishRetrieve ticket=-2**63": lambda v: p.FinishRetrieve(-(2**63)),
    "FinishRetrieve ticket=2**64-1": lambda v: p.FinishRetrieve(2**64 - 1),
    "Fence an lmcache_driven engine": lambda v: p.Fence(LMCACHE_VICTIM),
    "Fence 10 KB instance id": lambda v: p.Fence("f" * 10_000),
    "UnregisterKVCache 10 KB instance id": lambda v: p.UnregisterKVCache("u" * 10_000),
    "Hello 10 KB version": lambda v: p.Hello("v" * 10_000, "fault"),
}


# Cases whose values are plainly invalid: they must get an Error, not a reply. (The others may
# be served or refused, as long as the answer is prompt and not an internal error.)
REFUSED = {
    name for name in CASES
    if not name.startswith(("Lookup 100k", "Lookup 10 KB", "EndSession", "Hello", "Fence an", "PrepareStore on",
                            "Store 100k copies", "Retrieve skip_blocks=2**6", "PrepareStore 100k",
                            "PrepareRetrieve 100k", "CommitStore 100k"))
    and name not in ("RegisterKVCache 100k layers", "RegisterKVCache inner 10 KB",
                     "RegisterKVCache instance id with a forged line", "ReleaseLocks 100k hashes")
}


@pytest.mark.parametrize("name", list(CASES))
def test_named_hostile_request(live: LiveServer, name: str) -> None:
    problems = Problems()
    if name.startswith(("Store", "Retrieve", "PrepareStore", "PrepareRetrieve", "Fence")):
        live.state.refresh()  # an earlier case may have replaced the victim these aim at
    _run_one(live, CASES[name](live.state), problems, must_refuse=name in REFUSED)
    assert not problems, problems.report()


def test_a_client_name_cannot_forge_server_log_lines(live: LiveServer) -> None:
    """The name a client gives in Hello lands in the server's log: it must not start a line of
    its own (an operator greps 'LMCache ERROR:')."""
    marker = f"fault-{random.getrandbits(32):08x}"
    problems = Problems()
    _run_one(live, p.Hello(__version__, f"{marker}\n{FORGED} by {marker}\r\n{FORGED} again"), problems)
    sync_output(live.server)
    assert not problems, problems.report()
    forged = [line for line in forged_lines(live.server) if marker in line]
    assert not forged, f"a client forged server log lines: {forged}"
