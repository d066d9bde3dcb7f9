"""A circuit breaker for a tier on the network: after a few failed calls in a row the tier is
skipped at once (a miss costs nothing; a hung call would cost every lookup its timeout), and a
background thread probes it again with a growing back-off until it answers.

It starts open ("connecting"), so a server whose Redis is not up yet starts anyway and begins
using it as soon as a probe succeeds. Requests never probe: only the prober thread does.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any

from lmcache.log import init_logger

logger = init_logger(__name__)

FAILURES_TO_OPEN = 3  # consecutive failed calls
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 8.0


class BreakerState(str, enum.Enum):
    CONNECTING = "connecting"  # never reached yet
    OK = "ok"  # closed: calls go through
    OPEN = "open"  # calls are skipped until a probe succeeds


class Breaker:
    def __init__(self, name: str, probe: Callable[[], None], max_backoff_s: float = MAX_BACKOFF_S) -> None:
        """``probe()`` raises while the service is unusable (it may connect first)."""
        self._name = name
        self._probe = probe
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.state = BreakerState.CONNECTING
        self._failures = 0
        self._backoff_s = FIRST_BACKOFF_S
        self._retry_at = time.monotonic()
        self.opened = 0  # times it opened (a reconnect after each)
        self.last_error = ""
        self._stopping = False
        self._thread = threading.Thread(target=self._probe_loop, name=f"lmcache-probe-{name}", daemon=True)
        self._thread.start()

    def allows(self) -> bool:
        return self.state is BreakerState.OK

    def succeeded(self) -> None:
        self._failures = 0  # a plain store: a lost update only delays the next opening

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self._failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            if self.state is not BreakerState.OK or self._failures < FAILURES_TO_OPEN:
                return
            self.state = BreakerState.OPEN
            self.opened += 1
            self._backoff_s = FIRST_BACKOFF_S
            self._retry_at = time.monotonic() + self._backoff_s
            self._wake.notify()
        logger.warning("L2 %s: %d calls failed in a row (%s); skipped until it answers again (next try in %.2f s)",
                       self._name, FAILURES_TO_OPEN, self.last_error, self._backoff_s)

    def _probe_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and (self.state is BreakerState.OK or time.monotonic() < self._retry_at):
                    wait = None if self.state is BreakerState.OK else self._retry_at - time.monotonic()
                    self._wake.wait(wait)
                if self._stopping:
                    return
                was = self.state
            try:
                self._probe()
            except Exception as e:  # noqa: BLE001 - whatever the client raises, the service is not usable
                with self._lock:
                    self.last_error = f"{type(e).__name__}: {e}"
                    if was is BreakerState.CONNECTING and self._backoff_s == FIRST_BACKOFF_S:
                        logger.warning("L2 %s is not reachable yet (%s); serving without it, retrying", self._name, e)
                    self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
                    self._retry_at = time.monotonic() + self._backoff_s
                continue
            with self._lock:
                self.state = BreakerState.OK
                self._failures = 0
                self._backoff_s = FIRST_BACKOFF_S
            logger.info("L2 %s is %s", self._name, "connected" if was is BreakerState.CONNECTING else "reachable again")

    def status(self) -> dict[str, Any]:
        with self._lock:
            retry = max(0.0, self._retry_at - time.monotonic()) if self.state is not BreakerState.OK else None
            return {"state": self.state.value, "retry_in_s": None if retry is None else round(retry, 3),
                    "backoff_s": self._backoff_s, "consecutive_failures": self._failures, "breaker_opened": self.opened,
                    "last_error": self.last_error}

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(5)
