"""What the engine raises for a request it cannot serve; the faces turn it into an Error reply."""

from __future__ import annotations


class RequestError(ValueError):
    """A well-formed request whose values the engine cannot accept (a bad_request Error)."""


class UnknownInstanceError(RequestError):
    """The request names an engine that is not registered (any more): it must register again
    (an unknown_instance Error, which the connector takes as "the server restarted")."""
