"""lmcache_driven copies in progress: the L1 locks an engine was handed by a Prepare*, named by a
ticket until its CommitStore or FinishRetrieve (or its death) gives them back."""

from __future__ import annotations

import enum
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmcache.server.errors import RequestError
from lmcache.server.registry import Registration
from lmcache.storage.l1 import LockHandle

# The ticket of a Prepare* that holds nothing; CommitStore/FinishRetrieve accept it as a no-op.
NO_TICKET = 0


class TicketKind(str, enum.Enum):
    STORE = "store"
    RETRIEVE = "retrieve"


@dataclass
class Ticket:
    kind: TicketKind
    registration: Registration
    handles: list[LockHandle | None]
    created: float = field(default_factory=time.monotonic)
    start: float = field(default_factory=time.perf_counter)


class Tickets:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, Ticket] = {}
        self._held: dict[str, int] = {}  # engine -> bytes its open store tickets hold

    def held_bytes(self, instance_id: str) -> int:
        """The L1 bytes an engine's open store tickets hold (prepared, not committed yet)."""
        with self._lock:
            return self._held.get(instance_id, 0)

    def _count(self, ticket: Ticket, sign: int) -> None:  # (lock held)
        if ticket.kind is TicketKind.STORE:
            engine = ticket.registration.instance_id
            held = self._held.get(engine, 0) + sign * sum(h.obj.nbytes for h in ticket.handles if h is not None)
            if held:
                self._held[engine] = held
            else:
                self._held.pop(engine, None)

    def __len__(self) -> int:
        return len(self._open)

    def issue(self, ticket: Ticket) -> int:
        """The ticket's number; NO_TICKET (nothing remembered) when it holds nothing, so a flood
        of misses grows nothing."""
        if not any(h is not None for h in ticket.handles):
            return NO_TICKET
        with self._lock:
            # Random, not counted: a ticket of a server that was replaced, or of another engine,
            # must never name one of this server's (it would publish or free slots in use).
            number = secrets.randbits(62) + 1
            while number in self._open:
                number = secrets.randbits(62) + 1
            self._open[number] = ticket
            self._count(ticket, +1)
        return number

    def take(self, number: int, kind: TicketKind, instance_id: str = "") -> Ticket | None:
        """The ticket, taken out; None for NO_TICKET. With ``instance_id``, only that engine's."""
        if number == NO_TICKET:
            return None
        with self._lock:
            ticket = self._open.get(number)
            if ticket is None or ticket.kind is not kind or instance_id not in ("", ticket.registration.instance_id):
                raise RequestError(f"unknown or expired {kind.value} ticket {number}")
            del self._open[number]
            self._count(ticket, -1)
        return ticket

    def sweep(self, lock_ttl_s: float, release_held: Callable[[list[LockHandle | None]], object],
              release: Callable[[list[LockHandle | None]], object]) -> None:
        """Past the lock TTL a ticket's locks have expired. A retrieve ticket goes, and its read
        locks with it (``release``: on a chunk others keep locking they would not expire); a
        late FinishRetrieve finds it unknown, and the engine's load counts as failed. A store
        ticket stays while its engine lives: the slots it was handed are orphans that only its
        commit, or its death, gives back (``release_held``)."""
        stale = time.monotonic() - lock_ttl_s
        with self._lock:
            old = [(n, t) for n, t in self._open.items() if t.created <= stale]
        gone = []
        for number, ticket in old:
            watch = ticket.registration.watch
            if ticket.kind is TicketKind.RETRIEVE or watch is None or not watch.alive():
                gone.append(number)  # asked outside the lock: alive() touches the file system
        with self._lock:
            dropped = [t for n in gone if (t := self._open.pop(n, None)) is not None]
            for ticket in dropped:
                self._count(ticket, -1)
        for ticket in dropped:
            (release_held if ticket.kind is TicketKind.STORE else release)(ticket.handles)
