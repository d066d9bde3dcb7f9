"""Runs the real `lmcache server` (lmcache.cli.main, same arguments) with faults planted from
the environment; fault_support.start_server launches it.

LMCACHE_FAULT_ADDRESS_SPACE=<bytes>
    caps the process's address space, so a request that makes the server allocate without
    bound fails inside the server (MemoryError) instead of exhausting the test machine.
LMCACHE_FAULT_KILL_FRAME=<hex>
    a message carrying this frame makes the ZMQ loop thread's receive raise a BaseException,
    which no per-message error handling catches: the loop thread dies, as it would from a bug
    in the loop itself. What the process does then (/healthcheck, exit status) is under test.
"""

from __future__ import annotations

import os
import resource
import sys


class InjectedLoopDeath(BaseException):
    """Planted by the fault suite: the ZMQ loop thread dies here."""


def _cap_address_space() -> None:
    limit = os.environ.get("LMCACHE_FAULT_ADDRESS_SPACE")
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))


def _plant_loop_killer() -> None:
    trigger = os.environ.get("LMCACHE_FAULT_KILL_FRAME")
    if not trigger:
        return
    frame = bytes.fromhex(trigger)
    import zmq

    receive_one = zmq.Socket.recv
    receive_all = zmq.Socket.recv_multipart

    # Both ways a loop may read a message (whole, or frame by frame) carry the trigger.
    def recv(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        got = receive_one(self, *args, **kwargs)
        if bytes(got) == frame:
            raise InjectedLoopDeath("the fault suite killed the ZMQ loop thread")
        return got

    def recv_multipart(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        frames = receive_all(self, *args, **kwargs)
        if any(bytes(f) == frame for f in frames):
            raise InjectedLoopDeath("the fault suite killed the ZMQ loop thread")
        return frames

    zmq.Socket.recv = recv  # type: ignore[method-assign]
    zmq.Socket.recv_multipart = recv_multipart  # type: ignore[method-assign]

if __name__ == "__main__":
    _cap_address_space()
    _plant_loop_killer()
    from lmcache.cli import main

    main(sys.argv[1:])
