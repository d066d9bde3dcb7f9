"""The wire protocol between clients (vLLM's connector, the simulator, `lmcache ping`) and the server.

Envelope. A client's DEALER socket sends one multipart message per request::

    [request id, message, *bulk]

``request id`` is opaque bytes (at most ``MAX_REQUEST_ID_BYTES``) that the server echoes back
unchanged; ``message`` is one msgpack frame holding a tagged Struct; further frames are reserved
for bulk bytes of the transfer modes that need them. Every reply is ``[request id, message]``
where the message is the request's result Struct or an ``Error``.

Message ids (the Struct tags) are stable: never renumber or reuse one. Requests use 1..99,
replies 100 and up.

===  ==============  =================================================
id   message         purpose
===  ==============  =================================================
1    Hello           version check; server facts (chunk size, modes)
2    Ping            liveness
3    Status          the same document as HTTP ``GET /status``
4    Clear           drop every cached object (as ``POST /clear-cache``)
5    Lookup          leading chunks cached; optionally read-lock them
6    ReleaseLocks    give back a session's lookup locks
7    EndSession      forget a request: release all its locks
8    RegisterKVCache an engine's paged KV cache: page layout + SHM segments or CUDA IPC handles
9    UnregisterKVCache
10   Store           copy chunks out of registered blocks into L1
11   Retrieve        copy cached chunks into registered blocks
12   PrepareStore    lmcache_driven: reserve L1 slots the engine copies chunks into
13   CommitStore     lmcache_driven: publish (or drop) the prepared slots
14   PrepareRetrieve lmcache_driven: read-lock the cached chunks and say where they are
15   FinishRetrieve  lmcache_driven: the engine has copied them; release the locks
16   Fence           cuda_ipc: a server event after everything queued for the engine's GPU
100  Error           any request can get this instead of its reply
101  HelloReply
102  Pong
103  StatusReply
104  ClearReply
105  LookupReply
106  Released        reply to ReleaseLocks and EndSession
107  Registered
108  Unregistered
109  StoreReply
110  RetrieveReply
111  Slots           reply to PrepareStore and PrepareRetrieve
112  Fenced          reply to Fence: the index of the server event to wait for
===  ==============  =================================================

Chunk hashes travel as one ``bytes`` field of concatenated 16-byte hashes (see keys.py).
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Union, get_args

import msgspec

from lmcache.keys import MAX_REQUEST_CHUNKS, MAX_WORLD_SIZE, CacheScope, Hashes, Name
from lmcache.page_layout import MAX_BLOCKS, MAX_LAYERS, PageLayout

PROTOCOL_VERSION = 1
MAX_REQUEST_ID_BYTES = 64

# Every size-like field is bounded here, so the decoder refuses an out-of-range value before
# anything proportional to it is built (keys.py and layouts.py hold the bounds of their types).
_BlockId = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCKS)]
BlockIds = Annotated[list[_BlockId], msgspec.Meta(max_length=MAX_REQUEST_CHUNKS * 64)]
_Flags = Annotated[list[bool], msgspec.Meta(max_length=MAX_REQUEST_CHUNKS)]
_Event = Annotated[bytes, msgspec.Meta(max_length=256)]
_Ticket = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
# Store and Retrieve: the engine's time.monotonic() (CLOCK_MONOTONIC, one clock per host: the
# server copies only engines on its own host) after which the engine has given up on the request
# and vLLM may reuse its blocks. 0: none. NaN fails ``ge``.
_Deadline = Annotated[float, msgspec.Meta(ge=0)]


class TransferMode(str, enum.Enum):
    """Who copies an engine's pages, and how (see the README's "Transfer modes")."""

    ENGINE_DRIVEN = "engine_driven"  # the server maps the engine's SHM segments and copies
    LMCACHE_DRIVEN = "lmcache_driven"  # the engine maps the server's L1 arena and copies
    CUDA_IPC = "cuda_ipc"  # the server opens the engine's GPU memory and copies on its stream


# What a CPU engine may ask for (``lmcache.mp.mp_transfer_mode``): "auto" takes lmcache_driven
# where the server offers it, else engine_driven.
AUTO_MODE = "auto"
CPU_MODE_CHOICES = (AUTO_MODE, TransferMode.ENGINE_DRIVEN.value, TransferMode.LMCACHE_DRIVEN.value)


# cuda_ipc: one distinct storage of an engine's GPU KV tensors (see transfer/cuda_ipc.py).
class CudaIpcStorage(msgspec.Struct, array_like=True, frozen=True):
    device_uuid: Annotated[str, msgspec.Meta(max_length=64)]  # 32 lowercase hex digits
    handle: Annotated[bytes, msgspec.Meta(max_length=256)]  # the IPC memory handle of the allocation holding the storage
    offset: Annotated[int, msgspec.Meta(ge=0, le=1 << 48)]  # bytes from the start of that allocation to the storage
    nbytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 48)]  # the storage's size



# The index of "no server event": the copies were done when the reply was sent (CPU engines).
NO_EVENT = -1


class _Message(msgspec.Struct, array_like=True, frozen=True):
    """Base of every wire message: encoded as a msgpack array whose first item is the tag."""


# --- requests -------------------------------------------------------------------------------


class Hello(_Message, tag=1):
    client_version: Name = ""
    client_name: Name = ""


class Ping(_Message, tag=2):
    pass


class Status(_Message, tag=3):
    pass


class Clear(_Message, tag=4):
    pass


class Lookup(_Message, tag=5):
    scope: CacheScope  # an empty page_format means: the format each rank registered
    hashes: Hashes
    all_ranks: bool = False  # count a chunk only if every rank of scope.world_size has it
    lock: bool = False  # read-lock the counted chunks for `session`
    session: Name = ""


class ReleaseLocks(_Message, tag=6):
    session: Name
    hashes: Hashes = b""  # empty: every lock the session holds


class EndSession(_Message, tag=7):
    session: Name


class RegisterKVCache(_Message, tag=8):
    instance_id: Name  # unique per engine worker; the server logs it as the "GPU ID"
    model: Name
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
    rank: Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD_SIZE)]
    layout: PageLayout
    segments: Annotated[list[Name], msgspec.Meta(max_length=MAX_LAYERS)]  # one SHM segment per storage, in order
    mode: TransferMode = TransferMode.ENGINE_DRIVEN
    # cuda_ipc: one per storage
    cuda: Annotated[list[CudaIpcStorage], msgspec.Meta(max_length=MAX_LAYERS)] = msgspec.field(default_factory=list)
    # lmcache_driven: a file in /dev/shm this engine holds an flock on for as long as it lives
    # (see transfer/liveness.py): slots it was handed are reused only once it is gone or done.
    liveness: Name = ""


class UnregisterKVCache(_Message, tag=9):
    instance_id: Name


class Store(_Message, tag=10):
    instance_id: Name
    hashes: Hashes  # the chunks, 16 bytes each
    block_ids: BlockIds  # blocks_per_chunk per chunk, in order
    salt: Name = ""
    event: _Event = b""  # cuda_ipc: the engine's interprocess event to wait for before reading
    deadline: _Deadline = 0.0  # past it the server reads no block and publishes nothing it read


class Retrieve(_Message, tag=11):
    instance_id: Name
    hashes: Hashes
    block_ids: BlockIds
    skip_blocks: _Count = 0  # leading blocks the engine already holds: not written
    salt: Name = ""
    event: _Event = b""  # cuda_ipc: the engine's interprocess event to wait for before writing
    deadline: _Deadline = 0.0  # past it the server writes no block


class PrepareStore(_Message, tag=12):
    instance_id: Name
    hashes: Hashes
    salt: Name = ""


class CommitStore(_Message, tag=13):
    ticket: _Ticket
    ok: _Flags  # per offset of the Slots reply: was the copy complete
    instance_id: Name = ""  # the engine the ticket was given to (checked when sent)


class PrepareRetrieve(_Message, tag=14):
    instance_id: Name
    hashes: Hashes
    salt: Name = ""


class FinishRetrieve(_Message, tag=15):
    ticket: _Ticket
    instance_id: Name = ""  # the engine the ticket was given to (checked when sent)


# --- replies --------------------------------------------------------------------------------


class ErrorCode(str, enum.Enum):
    BAD_ENVELOPE = "bad_envelope"  # wrong number of frames, or an oversized request id
    BAD_MESSAGE = "bad_message"  # the frame is not a valid message of a known type
    TOO_LARGE = "too_large"  # the request is larger than the server's limit
    BAD_REQUEST = "bad_request"  # well-formed, but its values are invalid
    UNKNOWN_INSTANCE = "unknown_instance"  # the engine is not registered (any more): register again
    INTERNAL = "internal"  # the server failed; it keeps serving


class Error(_Message, tag=100):
    code: ErrorCode
    message: str


class HelloReply(_Message, tag=101):
    server_version: str
    protocol_version: int
    server_id: str
    chunk_size: int
    transfer_modes: list[str]  # TransferMode values; strings, so an older client can read a newer server's list


class Pong(_Message, tag=102):
    pass


class StatusReply(_Message, tag=103):
    status: dict[str, Any]


class ClearReply(_Message, tag=104):
    cleared_objects: int


class LookupReply(_Message, tag=105):
    hit_chunks: int
    # The server's chunk size (0: an older server). A client that hashed with another size (the
    # server restarted with a new --chunk-size) learns it here and hashes again.
    chunk_size: int = 0


class Released(_Message, tag=106):
    locks: int


class Registered(_Message, tag=107):
    page_format: str
    blocks_per_chunk: int
    object_bytes: int
    l1_segment: str = ""  # lmcache_driven: the arena to map ...
    l1_bytes: int = 0  # ... and its size
    events: list[bytes] = msgspec.field(default_factory=list)  # cuda_ipc: the server's IPC events


class Unregistered(_Message, tag=108):
    pass


class StoreReply(_Message, tag=109):
    stored: int  # chunks copied into L1 by this request
    present: int  # already cached (or being cached by another request)
    skipped: int  # no room in L1
    event: int = NO_EVENT  # cuda_ipc: index of the server event recorded after the copies


class RetrieveReply(_Message, tag=110):
    retrieved: int  # leading chunks written into the blocks; the rest were not touched
    event: int = NO_EVENT  # cuda_ipc: index of the server event recorded after the copies


class Slots(_Message, tag=111):
    ticket: int  # names the locks until CommitStore / FinishRetrieve (or the lock TTL)
    offsets: list[int]  # arena offset per chunk; -1: nothing to copy for it (store only)
    present: int = 0
    skipped: int = 0


class Fence(_Message, tag=16):
    instance_id: Name


class Fenced(_Message, tag=112):
    event: int  # the server event recorded after everything queued so far (-1: not a GPU engine)


Request = Union[  # noqa: UP007 - the decoder tables below read its __args__
    Hello, Ping, Status, Clear, Lookup, ReleaseLocks, EndSession, RegisterKVCache, UnregisterKVCache, Store, Retrieve,
    PrepareStore, CommitStore, PrepareRetrieve, FinishRetrieve, Fence,
]
Reply = Union[  # noqa: UP007
    Error, HelloReply, Pong, StatusReply, ClearReply, LookupReply, Released, Registered, Unregistered, StoreReply,
    RetrieveReply, Slots, Fenced,
]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


class ProtocolError(Exception):
    """A message that cannot be accepted; becomes an ``Error`` reply with ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_reply(self) -> Error:
        return Error(self.code, self.message)


def encode(message: _Message) -> bytes:
    return _encoder.encode(message)


def decode_request(frame: bytes | memoryview) -> Request:
    """The request in ``frame``; any bytes that are not one raise ProtocolError, nothing else."""
    try:
        return _request_decoder.decode(frame)
    except msgspec.ValidationError as e:
        # A value outside its bound is a well-formed message with a bad value; anything else
        # (a wrong type, a missing field) is not a message at all.
        code = ErrorCode.BAD_REQUEST if _OUT_OF_BOUNDS.match(str(e)) else ErrorCode.BAD_MESSAGE
        raise ProtocolError(code, _explain_invalid(frame, e)) from None
    except Exception as e:  # noqa: BLE001 - DecodeError, and whatever else a hostile frame may provoke
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"cannot decode message frame: {e}") from None


# msgspec's words for a value that breaks a Meta constraint: "Expected `int` <= 1024 - at ..."
_OUT_OF_BOUNDS = re.compile(r"Expected `\w+` (?:of length )?[<>]=? ")
_REQUEST_TYPES: dict[Any, type[msgspec.Struct]] = {cls.__struct_config__.tag: cls for cls in get_args(Request)}
_REQUEST_TAGS = {tag: cls.__name__ for tag, cls in _REQUEST_TYPES.items()}
_REPLY_TAGS = {cls.__struct_config__.tag: cls.__name__ for cls in get_args(Reply)}
_AT_FIELD = re.compile(r"^(.*) - at `\$\[(\d+)\](.*)`$")


def _name_field(cls: type[msgspec.Struct], error: str) -> str:
    """msgspec's "... - at `$[3][0]`" as "block_ids[0]: ..." (item 0 of a message is its tag)."""
    m = _AT_FIELD.match(error)
    if m is None or not 1 <= int(m[2]) <= len(cls.__struct_fields__):
        return error
    return f"{cls.__struct_fields__[int(m[2]) - 1]}{m[3]}: {m[1]}"


def _explain_invalid(frame: bytes | memoryview, error: msgspec.ValidationError) -> str:
    """Says which message id was wrong, when the frame is an array that starts with one.

    Must be total and cheap: it runs on frames the decoder already refused, whose first item
    may be anything, and which may be megabytes of nested values; so only the id is read.
    """
    tag = _message_id(bytes(frame[:10]))
    if tag is None:
        return f"not a valid request (it does not start with an integer message id): {error}"
    if tag in _REQUEST_TAGS:
        return f"invalid {_REQUEST_TAGS[tag]} message: {_name_field(_REQUEST_TYPES[tag], str(error))}"
    if tag in _REPLY_TAGS:
        return f"message id {tag} is a reply ({_REPLY_TAGS[tag]}), not a request"
    return f"unknown message id {tag}"


_ARRAY_HEADERS = {0xDC: 3, 0xDD: 5}  # array16, array32: header bytes
_UINTS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _message_id(head: bytes) -> int | None:
    """The first item of a msgpack array if it is a non-negative integer, else None."""
    if not head:
        return None
    first = head[0]
    if 0x90 <= first <= 0x9F:
        at = 1
    elif first in _ARRAY_HEADERS:
        at = _ARRAY_HEADERS[first]
    else:
        return None
    if len(head) <= at:
        return None
    kind = head[at]
    if kind <= 0x7F:
        return kind
    size = _UINTS.get(kind)
    if size is None or len(head) < at + 1 + size:
        return None
    return int.from_bytes(head[at + 1 : at + 1 + size], "big")


def decode_reply(frame: bytes | memoryview) -> Reply:
    try:
        return _reply_decoder.decode(frame)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not a valid reply: {e}") from None
