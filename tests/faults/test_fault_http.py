"""The admin HTTP app under random and malformed requests: random methods (standard and
garbage), paths (very long, %-encoded junk, ../), headers and bodies, sent as raw bytes over a
socket, plus hand-written malformed HTTP. Never a 5xx, the server stays healthy (HTTP and ZMQ),
and only POST /clear-cache clears the cache.
"""

from __future__ import annotations

import itertools
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fault_support import (
    LiveServer, Problems, fuzz_settings, line_count, output_since, raw_http, short_repr, status_codes,
    sync_output, uncaught_lines,
)

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]
ROUTES = ["/healthcheck", "/status", "/metrics", "/clear-cache", "/", ""]
TOKEN = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
JUNK_PATHS = [
    "/%", "/%zz", "/%ff%fe", "/%00", "/%2e%2e/%2e%2e/etc/passwd", "/../../../etc/passwd", "/..", "//", "/./status",
    "/status/..", "/healthcheck/../status", "/healthcheck%00", "/healthcheck?%%%", "/healthcheck#frag", "*",
    "http://evil.example/healthcheck", "/\u2603", "/" + "a" * 10_000, "/" + "%41" * 5_000, "/status?" + "q=1&" * 2_000,
    "/healthcheck;x=1", "/HEALTHCHECK", "/metrics/", "/status//",
]


def _is_clear(method: str, target: str) -> bool:
    """Requests that may legitimately reach /clear-cache: POST to it (after %-decoding and
    dot-segment removal, which some servers do). The fuzzer does not send them: clearing is
    checked apart, in test_only_post_clear_cache_clears."""
    return method.upper() == "POST" and "clear" in urllib.parse.unquote(target).lower()


segments = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=" \r\n"), max_size=12)
paths = st.one_of(
    st.sampled_from(ROUTES),
    st.sampled_from(JUNK_PATHS),
    st.lists(segments, max_size=5).map(lambda parts: "/" + "/".join(parts)),
    st.builds(lambda route, q: f"{route}?{q}", st.sampled_from(ROUTES), segments),
)
methods = st.one_of(
    st.sampled_from(METHODS),
    st.text(st.sampled_from(TOKEN), min_size=1, max_size=12),  # any token is a valid method
    st.sampled_from(["get", "Post", "G\x00T", "GET GET", "\u00e9", "-", "M" * 5_000]),
)
header_names = st.one_of(
    st.text(st.sampled_from(TOKEN), min_size=1, max_size=20),
    st.sampled_from(["Content-Type", "Accept", "Cookie", "Authorization", "Transfer-Encoding", "Expect", "Upgrade",
                     "Connection", "X-Forwarded-For", "Range", "If-None-Match", "Content-Encoding"]),
)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40),
    st.sampled_from(["", "chunked", "gzip", "100-continue", "websocket", "bytes=0-1,-5", "Bearer x", "v" * 16_000,
                     "\u00e9\u00e8", "a\tb"]),
)
bodies = st.one_of(st.just(b""), st.binary(max_size=256), st.sampled_from([b"{}", b"[", b'{"a":', b"\x00" * 70_000]))


def _request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes, chunked: bool) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    elif body or method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.close()


def _clears(live: LiveServer) -> int:
    return httpx.get(f"{live.server.http_url}/status", timeout=5).json()["l1"]["clears"]


def _check_logged(live: LiveServer, what: str, first_line: int, problems: Problems) -> None:
    """A bad request is the client's error: the server answers it (or closes the connection)
    but must not log it as an uncaught exception, which anyone could use to flood the log."""
    sync_output(live.server)  # the log line, if any, was written before the connection closed
    if uncaught_lines(live.server, first_line):
        output = output_since(live.server, first_line)
        kept = [line for line in output.split("\n") if line.startswith(("LMCache", "Traceback")) or ": " in line[:80]]
        problems.add(what, "the server logged an uncaught exception", "\n".join(kept)[-800:])


def _fivexx(response: bytes) -> list[int]:
    return [code for code in status_codes(response) if code >= 500]


def test_random_requests_get_no_5xx_and_no_uncaught_error(live: LiveServer) -> None:
    problems = Problems()
    logged = Problems()  # answered fine, but logged as an uncaught exception
    numbers = itertools.count()
    clears_before, restarts_before = _clears(live), live.restarts

    @fuzz_settings(max_examples=120)
    @given(methods, paths, st.lists(st.tuples(header_names, header_values), max_size=6), bodies, st.booleans())
    def run(method: str, target: str, headers: list[tuple[str, str]], body: bytes, chunked: bool) -> None:
        if problems.gave_up or _is_clear(method, target):
            return
        data = _request_bytes(method, target or "/", headers, body, chunked)
        first_line = line_count(live.server)
        response = raw_http(live.server.http_port, data)
        what = f"{short_repr(method)} {short_repr(target)} headers={short_repr(headers)} body={short_repr(body)}" \
               f"{' chunked' if chunked else ''}"
        if _fivexx(response):
            problems.add(what, f"answered {_fivexx(response)}: {short_repr(response, 400)}")
        _check_logged(live, what, first_line, logged)
        if next(numbers) % 10 == 0 or _fivexx(response):  # the full check costs a ZMQ round trip too
            problems.check_server(live, what, first_line)

    run()
    problems.check_server(live, "after the whole run", 0)
    if live.restarts == restarts_before and _clears(live) != clears_before:
        problems.add("the random requests", f"the cache was cleared {_clears(live) - clears_before} time(s)")
    assert not problems, problems.report()
    assert not logged, logged.report()


def _chunk_bomb() -> bytes:
    return b"POST /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 20_000 + b"0\r\n\r\n"


MALFORMED = {
    "empty lines": b"\r\n\r\n\r\n",
    "method only": b"GET\r\n\r\n",
    "HTTP/0.9": b"GET /healthcheck\r\n",
    "HTTP/9.9": b"GET /healthcheck HTTP/9.9\r\nHost: x\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "TLS client hello": bytes.fromhex("160301020001000200030300") + b"\x00" * 500,
    "binary junk": bytes(range(256)) * 16,
    "bare LF line ends": b"GET /healthcheck HTTP/1.1\nHost: x\n\n",
    "NUL in the path": b"GET /health\x00check HTTP/1.1\r\nHost: x\r\n\r\n",
    "control character in the path": b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    "target without a leading slash": b"GET x HTTP/1.1\r\nHost: x\r\n\r\n",
    "target '?'": b"GET ? HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid UTF-8 in the path": b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid UTF-8 in a header": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nX-A: \xff\xfe\r\n\r\n",
    "header without a colon": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    "header with a space before the colon": b"GET /healthcheck HTTP/1.1\r\nHost : x\r\n\r\n",
    "obsolete header folding": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "a 100 KB header": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100_000 + b"\r\n\r\n",
    "2000 headers": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n",
    "a 100 KB request line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "Content-Length -1": b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "Content-Length abc": b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "Content-Length 2**64": b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n",
    "two Content-Lengths": b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\nabcde",
    "body shorter than Content-Length": b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc",
    "Content-Length 100 MB, no body": b"PUT /status HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n",
    "chunked and Content-Length": b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
                                  b"\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk size 2**64": b"POST /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"10000000000000000\r\nabc\r\n",
    "unterminated chunks": b"POST /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    "20000 one-byte chunks": _chunk_bomb(),
    "Transfer-Encoding gzip": b"POST /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "Expect 100-continue": b"POST /status HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    "Expect junk": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nExpect: 999-junk\r\n\r\n",
    "websocket upgrade": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "h2c upgrade": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
    "CONNECT": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-form target": b"GET http://evil.example/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n",
    "no Host": b"GET /healthcheck HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET /healthcheck HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "Range junk": b"GET /metrics HTTP/1.1\r\nHost: x\r\nRange: bytes=99999999-0,-,a\r\n\r\n",
    "Accept-Encoding junk": b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip;q=nan, *;q=-1\r\n\r\n",
    "Content-Type junk on POST": b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary="
                                b"\r\nContent-Length: 5\r\n\r\n--\r\n\r",
    "JSON body junk on POST": b"POST /healthcheck HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 2\r\n\r\n{[",
    "100 pipelined requests": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n" * 100,
    "pipelined after junk": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\nJUNK\r\n\r\nGET /status HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http_gets_no_5xx_and_no_uncaught_error(live: LiveServer, name: str) -> None:
    problems = Problems()
    logged = Problems()
    first_line = line_count(live.server)
    response = raw_http(live.server.http_port, MALFORMED[name])
    if _fivexx(response):
        problems.add(name, f"answered {_fivexx(response)}: {short_repr(response, 400)}")
    _check_logged(live, name, first_line, logged)
    problems.check_server(live, name, first_line)
    assert not problems, problems.report()
    assert not logged, logged.report()


def test_only_post_clear_cache_clears(live: LiveServer) -> None:
    """Every other method on /clear-cache (and POST on its look-alikes) leaves the cache alone;
    POST /clear-cache itself clears (which shows the counter checked here moves at all)."""
    others = [
        *(f"{m} /clear-cache HTTP/1.1" for m in ("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CLEAR",
                                                 "post", "Post", "POSTX", "XPOST")),
        "POST /clear-cache-x HTTP/1.1", "POST /clear HTTP/1.1", "POST /xclear-cache HTTP/1.1",
        "POST /status HTTP/1.1", "POST /healthcheck HTTP/1.1", "GET /clear-cache?method=POST HTTP/1.1",
    ]
    failures = []
    for line in others:
        before = _clears(live)
        data = f"{line}\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\nX-HTTP-Method-Override: POST\r\n\r\n"
        response = raw_http(live.server.http_port, data.encode())
        codes = status_codes(response)
        if _clears(live) != before:
            failures.append(f"{line!r} cleared the cache (answered {codes})")
        elif any(200 <= c < 300 for c in codes) and "clear-cache" in line and not line.startswith(("HEAD", "OPTIONS")):
            failures.append(f"{line!r} answered {codes} without clearing: it should be refused")
        if any(c >= 500 for c in codes):
            failures.append(f"{line!r} answered {codes}")
    before = _clears(live)
    r = httpx.post(f"{live.server.http_url}/clear-cache", timeout=5)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    assert _clears(live) == before + 1, "POST /clear-cache did not clear"
    assert not failures, "\n".join(failures)
    assert live.problem() is None, live.problem()
