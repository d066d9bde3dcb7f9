"""The HTTP admin face (Sanic): health, status, metrics and clearing, over the same CacheEngine.

With ``--admin-token`` set, every request that may change state (any method but GET, HEAD and
OPTIONS) must carry ``Authorization: Bearer <token>``; reads stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

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
    # back on the default (--default-quota-gb).
    @app.get("/quota")
    async def list_quotas(_: Request) -> HTTPResponse:
        count.labels(route="/quota", status="200").inc()
        return json(engine.quotas())

    @app.route("/quota/<salt:str>", methods=["GET", "PUT", "DELETE"])
    async def one_quota(request: Request, salt: str) -> HTTPResponse:
        if request.method == "PUT":
            body = request.json if request.body else None
            limit = body.get("limit_gb") if isinstance(body, dict) else None
            try:
                if limit is None:
                    raise RequestError('the body must be {"limit_gb": N}')
                engine.set_quota(salt, limit)
            except RequestError as e:
                count.labels(route="/quota", status="400").inc()
                return json({"status": "error", "reason": str(e)}, status=400)
        elif request.method == "DELETE":
            engine.set_quota(salt, None)
        count.labels(route="/quota", status="200").inc()
        return json(engine.quota(salt))

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
