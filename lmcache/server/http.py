"""The HTTP admin face (Sanic): health, status, metrics and clearing, over the same CacheEngine.

With ``--admin-token`` set, every request that may change state (any method but GET, HEAD and
OPTIONS) must carry ``Authorization: Bearer <token>``; reads stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import itertools
from json import loads
from typing import Any
from urllib.parse import parse_qsl, unquote

from sanic import Request, Sanic
from sanic.exceptions import BadRequest, SanicException
from sanic.response import HTTPResponse, json, raw

from lmcache.security import bearer_matches
from lmcache.server.engine import CacheEngine
from lmcache.server.errors import RequestError
from lmcache.server.metrics import ServerMetrics
from lmcache.storage.l2.tier import TierClearError

# Sanic refuses two apps of one name in a process.
_app_ids = itertools.count()


class _AdminRequest(Request):
    """Sanic answers a request it cannot parse through a stand-in request built from the same
    URL; when the URL itself was the problem (``GET ?``, a NUL or control byte in the path), the
    stand-in fails the same way, and the client got no answer while Sanic logged a traceback.
    The stand-in (method ``NONE``) gets a harmless URL instead, so the client gets its 400."""

    def __init__(self, url_bytes: bytes, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(url_bytes, *args, **kwargs)
        except BadRequest:
            if kwargs.get("method") != "NONE":
                raise
            super().__init__(b"/", *args, **kwargs)


def _route_label(request: Request) -> str:
    """A route's metrics label: its first segment ("/quota" for every /quota/{salt}), "other"
    for paths no route matches. Never the path itself: labels must come from a fixed set, or
    scanners and tenants' salts would grow /metrics without bound (and show the salts)."""
    if request.route is None:
        return "other"
    return "/" + request.route.path.strip("/").split("/")[0]


def build_app(engine: CacheEngine, metrics: ServerMetrics) -> Sanic:
    app = Sanic(f"lmcache_admin_{next(_app_ids)}", configure_logging=False, request_class=_AdminRequest)
    app.config.MOTD = False
    app.config.ACCESS_LOG = False
    app.config.REQUEST_MAX_SIZE = 64 << 10  # no admin route takes a body worth buffering
    # Sanic's ceiling (8 KiB by default): the request line of /quota/{salt} carries any salt
    # of MAX_NAME_CHARS ASCII characters, %-encoded; longer encodings go in /quota/'s body.
    app.config.REQUEST_MAX_HEADER_SIZE = 16_384
    count = metrics.http_requests
    token = engine.config.admin_token

    if token:

        @app.on_request
        async def require_token(request: Request) -> HTTPResponse | None:
            # Checked by method rather than per route, so a new POST route cannot forget it. Sanic
            # also runs this for paths and methods it has no route for: unauthenticated writers
            # get 401 there too, and learn nothing about which routes exist.
            if request.method in ("GET", "HEAD", "OPTIONS"):
                return None
            if bearer_matches(request.headers.get("authorization"), token):
                return None
            count.labels(route=_route_label(request), status="401").inc()
            return json(
                {"status": "error", "error": "this route needs 'Authorization: Bearer <admin token>' "
                 "(the server's --admin-token)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="lmcache"'},
            )

    @app.get("/healthcheck")
    async def healthcheck(_: Request) -> HTTPResponse:
        healthy, reason = engine.health()
        if healthy:
            count.labels(route="/healthcheck", status="200").inc()
            return json({"status": "healthy"})
        count.labels(route="/healthcheck", status="503").inc()
        return json({"status": "unhealthy", "reason": reason}, status=503)

    @app.post("/clear-cache")
    async def clear_cache(request: Request) -> HTTPResponse:
        # L1 only, as the spec says; ?tier=all also empties the L2 tiers (on a thread: it
        # deletes files).
        tier = request.args.get("tier", "l1")
        if tier not in ("l1", "all"):
            count.labels(route="/clear-cache", status="400").inc()
            return json({"status": "error", "reason": f"tier must be l1 or all (got {tier!r})"}, status=400)
        if tier == "all":
            try:
                await asyncio.to_thread(engine.clear, True)
            except TierClearError as e:  # the operator must know: that KV may still be served
                count.labels(route="/clear-cache", status="503").inc()
                return json({"status": "error", "reason": f"not every L2 tier was cleared: {e}"}, status=503)
        else:
            engine.clear()
        count.labels(route="/clear-cache", status="200").inc()
        return json({"status": "ok"})

    # Tenants (cache salts): GET /quota lists the quotas (tenants by a digest of their salt);
    # PUT /quota/{salt} {"limit_gb": N} caps what one salt may hold in L1, DELETE puts it
    # back on the default (--default-quota-gb), GET shows it. {salt} is everything after
    # "/quota/", percent-decoded once as UTF-8 (%2F is a "/" of the salt, %25 a "%"). A salt
    # no path can carry (the empty salt of requests without one, ".", "..": clients resolve
    # those segments away) goes in the query instead: /quota/?salt=... (form-encoded), or in
    # the JSON body of /quota/ as {"salt": ...}.
    @app.get("/quota")
    async def list_quotas(request: Request) -> HTTPResponse:
        if any(k == "salt" for k, _ in parse_qsl(request.query_string, keep_blank_values=True)):  # as /quota/?salt=
            return await one_quota(request, None)
        count.labels(route="/quota", status="200").inc()
        return json(engine.quotas())

    async def one_quota(request: Request, salt: str | None) -> HTTPResponse:
        try:
            body = _json_body(request)
            given = _query_salts(request) + ([body["salt"]] if "salt" in body else [])
            if salt is None:
                if len(given) != 1 or not isinstance(given[0], str):
                    raise RequestError('/quota/ needs the salt once, as a string: /quota/?salt=... or {"salt": "..."} '
                                       "(?salt= is the empty salt, that of requests without one)")
                salt = given[0]
            elif given:
                raise RequestError("name the salt once: in the path, or with /quota/ in ?salt= or the body")
            if request.method == "PUT":
                limit = body.get("limit_gb")
                if limit is None:
                    raise RequestError('the body must be {"limit_gb": N}')
                engine.set_quota(salt, limit)
            elif request.method == "DELETE":
                engine.set_quota(salt, None)
            answer = engine.quota(salt)
        except RequestError as e:
            count.labels(route="/quota", status="400").inc()
            return json({"status": "error", "reason": str(e)}, status=400)
        count.labels(route="/quota", status="200").inc()
        return json(answer)

    @app.route("/quota/<rest:path>", methods=["GET", "PUT", "DELETE"])
    async def quota_by_path(request: Request, rest: str) -> HTTPResponse:
        # From the raw path, not the route's parameter: decoded exactly once, here.
        raw = request.path[len("/quota/"):]
        try:
            salt = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            count.labels(route="/quota", status="400").inc()
            return json({"status": "error", "reason": "the salt in the path is not percent-encoded UTF-8"}, status=400)
        return await one_quota(request, salt)

    @app.route("/quota/", methods=["GET", "PUT", "DELETE"], strict_slashes=True)
    async def quota_by_query(request: Request) -> HTTPResponse:
        return await one_quota(request, None)

    @app.get("/status")
    async def status(_: Request) -> HTTPResponse:
        count.labels(route="/status", status="200").inc()
        return json(engine.status())

    @app.get("/metrics")
    async def prometheus(_: Request) -> HTTPResponse:
        count.labels(route="/metrics", status="200").inc()
        body, content_type = metrics.render()
        return raw(body, content_type=content_type)

    @app.exception(SanicException)
    async def http_error(request: Request, error: SanicException) -> HTTPResponse:
        # Unknown routes (404), wrong methods (405) and the like answer JSON, not HTML.
        code = getattr(error, "status_code", 500)
        count.labels(route="other", status=str(code)).inc()
        return json(
            {"status": "error", "error": str(error), "path": request.path, "method": request.method},
            status=code,
            headers=getattr(error, "headers", None),
        )

    return app


def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object ({} without a body); anything else is the client's error."""
    if not request.body:
        return {}
    try:
        body = loads(request.body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError('the body must be a JSON object, such as {"limit_gb": N}')
    return body


def _query_salts(request: Request) -> list[str]:
    """Every ?salt= of the query, blank ones too (the empty salt)."""
    try:
        return [v for k, v in parse_qsl(request.query_string, keep_blank_values=True, errors="strict") if k == "salt"]
    except UnicodeDecodeError:
        raise RequestError("the query is not percent-encoded UTF-8") from None
