"""One logging setup for the whole package.

Every line reads ``LMCache <LEVEL>: <message> [<local time>]``: it starts with the form the quick
start documents, so an operator can grep for ``LMCache INFO: Stored`` whichever part of the
process wrote it (our modules or Sanic's), and the time comes last so that it never splits that
form.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "LMCache %(levelname)s: %(message)s [%(asctime)s.%(msecs)03d]"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_ROOT = "lmcache"
# Sanic logs through these; they share our handler so there is one format per process.
_SANIC_LOGGERS = ("sanic.root", "sanic.error", "sanic.server", "sanic.access", "sanic.websockets")
_handler: logging.Handler | None = None


class _OneLineFormatter(logging.Formatter):
    """Escapes control characters in messages: text a client sent (a name, an id) that holds a
    newline must not be able to forge a log line of its own. Tracebacks keep their lines."""

    _ESCAPES = {c: f"\\x{c:02x}" for c in range(32) if c != 9} | {
        c: f"\\u{c:04x}" for c in (0x7F, 0x85, 0x2028, 0x2029)  # what some log readers split lines on
    }

    _TRACEBACK_ESCAPES = {c: e for c, e in _ESCAPES.items() if c != 10}

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = record.message.translate(self._ESCAPES)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        # A traceback keeps its lines, but its text may quote what a client sent (a URL).
        return super().formatException(ei).translate(self._TRACEBACK_ESCAPES)


def _configure_once() -> logging.Handler:
    global _handler
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(_OneLineFormatter(_FORMAT, _DATE_FORMAT))
        root = logging.getLogger(_ROOT)
        root.addHandler(_handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return _handler


def init_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` (normally ``__name__``), configured on first use."""
    _configure_once()
    if name != _ROOT and not name.startswith(_ROOT + "."):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def set_level(level: str) -> None:
    """Sets the package's level; Sanic's own chatter stays at WARNING or above."""
    handler = _configure_once()
    numeric = logging.getLevelName(level.upper())
    logging.getLogger(_ROOT).setLevel(numeric)
    for name in _SANIC_LOGGERS:
        sanic_logger = logging.getLogger(name)
        sanic_logger.handlers = [handler]
        sanic_logger.propagate = False
        sanic_logger.setLevel(max(numeric, logging.WARNING))
