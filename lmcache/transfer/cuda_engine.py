"""The engine's side of CUDA ordering: never a synchronize() in vLLM's process.

Before each Store or Retrieve the worker records its interprocess event on the current stream
(after the forward pass that wrote, or last read, the blocks) and sends the event's handle; the
server's stream waits on it. The server answers with the index of one of its own interprocess
events, recorded after the copies; the worker asks that event, without blocking, whether the
copies are done before it reports a load or a store as finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class GpuSync:
    def __init__(self, device: Any, server_events: Sequence[bytes]) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self._mine = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
        self._mine.record(torch.cuda.current_stream(self.device))
        self._handle = bytes(self._mine.ipc_handle())
        self._server = [torch.cuda.Event.from_ipc_handle(self.device, bytes(h)) for h in server_events]

    def ready(self) -> bytes:
        """Marks "the blocks are ready" on the current stream; the handle to send with the request."""
        self._mine.record(self._torch.cuda.current_stream(self.device))
        return self._handle

    def done(self, index: int) -> bool:
        """True once the copies the server recorded ``index`` after have run (never blocks)."""
        return index < 0 or self._server[index].query()
