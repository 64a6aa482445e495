"""Issue 13, direction 3: the request parser is llhttp (httptools) in strict mode.

Attacks on the HTTP framing against a real daemon, for everything the parser change
could have opened: request smuggling (Content-Length with Transfer-Encoding, two
different Content-Lengths, signed or hex lengths, an overflowing chunk size, obs-fold,
bare LF or CR line endings), malformed header lines (no colon, NUL), a pipelined
request that is malformed after a good one, heads over the cap (a long request line,
thousands of tiny headers, a header that never ends, sent in pieces) and chunked
bodies whose framing is bigger than their data. Each must get the right status and
error code, with ``connection: close``, and the daemon must then close the connection:
no later request on it is answered, and no refused request reaches a handler (the
audit log shows only the HTTP-layer refusal).
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

H = b"host: s\r\n"
AUTHORIZE = b"POST /v1/authorize HTTP/1.1\r\n" + H
HEALTH = b"GET /v1/health HTTP/1.1\r\n" + H + b"\r\n"
# A request that, if any of the attack bytes were taken for a request boundary, would
# reach a handler and leave an audit event (404 not_found is audited as request.rejected).
SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\n" + H + b"\r\n"
HEAD_CAP = 16 * 1024  # listen.max_header_bytes default
BODY_CAP = 256 * 1024  # listen.max_body_bytes default
HTTP_LAYER_CODES = {"bad_http", "headers_too_large", "body_too_large", "request_timeout"}


@pytest.fixture(scope="module")
def d() -> Iterator[Daemon]:
    # Every transport-level refusal fully audited (the default keeps 20 per uid per 10 s).
    daemon = Daemon({"audit": {"rejections_per_uid": {"burst": 100_000}}}).start()
    try:
        yield daemon
    finally:
        daemon.cleanup()


def exchange(d: Daemon, data: bytes, *, timeout: float = 15.0) -> tuple[bytes, bool]:
    """Send ``data`` without half-closing; read until the daemon closes. Returns
    (everything read, whether the daemon closed the connection within ``timeout``)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(d.socket)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return out, False
            except ConnectionResetError:
                return out, True
            if not chunk:
                return out, True
            out += chunk
        return out, False
    finally:
        s.close()


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each complete response in ``raw``, in order."""
    found = []
    pos = 0
    while (end := raw.find(b"\r\n\r\n", pos)) >= 0:
        lines = raw[pos:end].decode("latin-1").split("\r\n")
        m = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", lines[0])
        assert m, raw[pos:pos + 200]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        found.append((int(m.group(1)), headers, raw[end + 4:end + 4 + length]))
        pos = end + 4 + length
    assert pos == len(raw), f"bytes after the last whole response: {raw[pos:pos + 200]!r}"
    return found


def _sentinels(events: list[dict[str, Any]]) -> list[int]:
    return [i for i, e in enumerate(events) if "/v1/sentinel" in json.dumps(e)]


def mark(d: Daemon) -> int:
    """The audit position just after a new sentinel request's event (a 404, audited):
    every event of what was sent before it is on disk by then."""
    before = len(_sentinels(d.audit_events()))
    status, body = d.request("GET", "/v1/sentinel")
    assert status == 404, body
    deadline = time.monotonic() + 20
    while len(found := _sentinels(events := d.audit_events())) <= before:
        assert time.monotonic() < deadline, "the sentinel was never audited"
        time.sleep(0.02)
    del events
    return found[-1] + 1


def events_since(d: Daemon, start: int) -> list[dict[str, Any]]:
    """Audit events after ``start`` (a mark) up to a new mark, sentinels left out."""
    end = mark(d)
    return [e for e in d.audit_events()[start:end] if "/v1/sentinel" not in json.dumps(e)]


def refused(d: Daemon, data: bytes, status: int, code: str, *, answered_before: int = 0) -> None:
    """``data`` on one connection gets ``answered_before`` 200s, then ``status``/``code``
    with connection: close, then the daemon closes; only that refusal is audited."""
    start = mark(d)
    raw, closed = exchange(d, data)
    got = responses(raw)
    assert closed, ("the daemon kept the connection open", raw[:300])
    assert [g[0] for g in got] == [200] * answered_before + [status], raw[:600]
    _last_status, headers, body = got[-1]
    assert headers.get("connection") == "close", headers
    assert f'"code":"{code}"'.encode() in body.replace(b" ", b""), body
    new = events_since(d, start)
    assert len(new) == 1, new  # nothing reached a handler (a handler's refusal is audited too)
    assert new[0]["event_type"] == "request.rejected", new
    assert (new[0]["error"]["code"], new[0]["error"]["status"]) == (code, status), new


ATTACKS = {
    # request smuggling: two framings of one body
    "cl_and_te": (AUTHORIZE + b"content-length: 45\r\ntransfer-encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n" + SMUGGLED, 400, "bad_http"),
    "te_and_cl": (AUTHORIZE + b"transfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"
                  b"0\r\n\r\n" + SMUGGLED, 400, "bad_http"),
    "two_content_lengths": (AUTHORIZE + b"content-length: 2\r\ncontent-length: 45\r\n\r\n{}"
                            + SMUGGLED, 400, "bad_http"),
    "two_equal_content_lengths": (AUTHORIZE + b"content-length: 2\r\ncontent-length: 2\r\n\r\n{}",
                                  400, "bad_http"),
    "content_length_list": (AUTHORIZE + b"content-length: 2, 45\r\n\r\n{}" + SMUGGLED,
                            400, "bad_http"),
    "negative_content_length": (AUTHORIZE + b"content-length: -1\r\n\r\n" + SMUGGLED,
                                400, "bad_http"),
    "hex_content_length": (AUTHORIZE + b"content-length: 0x2\r\n\r\n{}" + SMUGGLED,
                           400, "bad_http"),
    "plus_content_length": (AUTHORIZE + b"content-length: +2\r\n\r\n{}", 400, "bad_http"),
    "overflowing_content_length": (AUTHORIZE + b"content-length: " + b"9" * 40 + b"\r\n\r\n{}",
                                   400, "bad_http"),
    "chunk_size_overflow": (AUTHORIZE + b"transfer-encoding: chunked\r\n\r\n" + b"f" * 40
                            + b"\r\n{}\r\n0\r\n\r\n" + SMUGGLED, 400, "bad_http"),
    "chunk_size_not_hex": (AUTHORIZE + b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
                           400, "bad_http"),
    "chunk_without_crlf": (AUTHORIZE + b"transfer-encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
                           400, "bad_http"),
    "chunk_size_bare_lf": (AUTHORIZE + b"transfer-encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n",
                           400, "bad_http"),
    "obs_fold": (AUTHORIZE + b"content-length: 2\r\nx: a\r\n folded\r\n\r\n{}", 400, "bad_http"),
    "space_before_colon": (AUTHORIZE + b"content-length : 45\r\n\r\n" + SMUGGLED, 400, "bad_http"),
    # malformed header lines
    "header_without_colon": (b"GET /v1/health HTTP/1.1\r\n" + H + b"no-colon-here\r\n\r\n",
                             400, "bad_http"),
    "nul_in_header_value": (b"GET /v1/health HTTP/1.1\r\n" + H + b"x: a\x00b\r\n\r\n",
                            400, "bad_http"),
    "nul_in_header_name": (b"GET /v1/health HTTP/1.1\r\n" + H + b"x\x00y: v\r\n\r\n",
                           400, "bad_http"),
    "control_in_header_value": (b"GET /v1/health HTTP/1.1\r\n" + H + b"x: a\x01\x7fb\r\n\r\n",
                                400, "bad_http"),
    "lf_only_line_endings": (b"GET /v1/health HTTP/1.1\nhost: s\n\n", 400, "bad_http"),
    "lf_only_after_header": (b"GET /v1/health HTTP/1.1\r\nhost: s\n\r\n", 400, "bad_http"),
    "cr_only_line_endings": (b"GET /v1/health HTTP/1.1\rhost: s\r\r", 400, "bad_http"),
    "nul_in_method": (b"G\x00T /v1/health HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_http"),
    "bad_target_bytes": (b"GET /v1/\xff\xfe HTTP/1.1\r\n" + H + b"\r\n", 400, "bad_http"),
    "no_host": (b"GET /v1/health HTTP/1.1\r\n\r\n", 400, "bad_http"),
    "two_hosts": (b"GET /v1/health HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400, "bad_http"),
    "http_0_9": (b"GET /v1/health\r\n\r\n", 400, "bad_http"),
    "http_2_0": (b"GET /v1/health HTTP/2.0\r\n\r\n", 400, "bad_http"),
    "http_9_9": (b"GET /v1/health HTTP/9.9\r\n" + H + b"\r\n", 400, "bad_http"),
    "h2_preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_http"),
    "upgrade_with_body": (AUTHORIZE + b"connection: upgrade\r\nupgrade: h2c\r\n"
                          b"content-length: 45\r\n\r\n" + SMUGGLED, 400, "bad_http"),
    # transfer codings other than chunked: 501, as before
    "te_gzip_chunked": (AUTHORIZE + b"transfer-encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                        501, "bad_http"),
    "te_identity": (AUTHORIZE + b"transfer-encoding: identity\r\n\r\n{}", 501, "bad_http"),
    "te_twice": (AUTHORIZE + b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n", 501, "bad_http"),
    # heads over the cap (16 KiB), whole
    "request_line_over_cap": (b"GET /" + b"a" * (HEAD_CAP + 10) + b" HTTP/1.1\r\n" + H + b"\r\n",
                              431, "headers_too_large"),
    "many_tiny_headers": (b"GET /v1/health HTTP/1.1\r\n" + H + b"h:\r\n" * 10_000 + b"\r\n",
                          431, "headers_too_large"),
    "one_big_header": (b"GET /v1/health HTTP/1.1\r\n" + H + b"x: " + b"v" * (HEAD_CAP + 10)
                       + b"\r\n\r\n", 431, "headers_too_large"),
    # bodies over the cap (256 KiB)
    "content_length_over_cap": (AUTHORIZE + b"content-length: %d\r\n\r\n{}" % (BODY_CAP + 1),
                                413, "body_too_large"),
    "chunked_over_cap": (AUTHORIZE + b"transfer-encoding: chunked\r\n\r\n"
                         + (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 5 + b"0\r\n\r\n",
                         413, "body_too_large"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_refused_and_closed(d: Daemon, name: str) -> None:
    data, status, code = ATTACKS[name]
    refused(d, data, status, code)


@pytest.mark.parametrize("name", ["header_without_colon", "lf_only_line_endings", "cl_and_te",
                                  "two_content_lengths", "many_tiny_headers", "nul_in_header_value"])
def test_malformed_after_good_pipelined_requests(d: Daemon, name: str) -> None:
    """Good requests before the bad one are answered in order; the bad one is refused
    and nothing after it is read as a request."""
    data, status, code = ATTACKS[name]
    refused(d, HEALTH * 3 + data + HEALTH, status, code, answered_before=3)


def test_head_in_pieces_is_refused_at_the_cap(d: Daemon) -> None:
    """A header that never ends, sent in pieces: refused (431) once the head passes the
    cap, not held until header_timeout_s while it grows."""
    start = mark(d)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(15)
        s.connect(d.socket)
        s.sendall(b"GET /v1/health HTTP/1.1\r\n" + H + b"x-endless: ")
        sent = 0
        piece = b"v" * 1024
        answer = b""
        while sent < 4 * 1024 * 1024:
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            if select.select([s], [], [], 0.01)[0]:
                answer = s.recv(65536)
                break
        assert answer.startswith(b"HTTP/1.1 431"), (sent, answer[:200])
        # Refused near the cap: within a receive or two of it, far before 4 MiB.
        assert sent <= HEAD_CAP + 3 * 64 * 1024, sent
    finally:
        s.close()
    new = events_since(d, start)
    assert [(e["event_type"], e["error"]["code"]) for e in new] == [
        ("request.rejected", "headers_too_large")], new


def test_chunk_framing_beyond_the_wire_cap_is_413(d: Daemon) -> None:
    """Chunk extensions carry no body bytes: a body of a few bytes framed in megabytes
    of extensions is refused (413) at 8x the body cap of wire bytes."""
    chunk = b"1;e=" + b"a" * 4000 + b"\r\nx\r\n"
    data = AUTHORIZE + b"transfer-encoding: chunked\r\n\r\n" + chunk * 1000 + b"0\r\n\r\n"
    assert len(data) > 8 * BODY_CAP + 64 * 1024
    refused(d, data, 413, "body_too_large")


def test_connection_close_and_http_1_0_end_the_connection(d: Daemon) -> None:
    for first in (b"GET /v1/health HTTP/1.1\r\n" + H + b"connection: close\r\n\r\n",
                  b"GET /v1/health HTTP/1.0\r\n\r\n",
                  b"GET /v1/health HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"):
        raw, closed = exchange(d, first + HEALTH)
        got = responses(raw)
        assert closed and [g[0] for g in got] == [200], raw[:400]
        assert got[0][1]["connection"] == "close"


def test_keep_alive_pipelined_in_order_and_leading_crlf(d: Daemon) -> None:
    paths = [b"/v1/health", b"/v1/nope-1", b"/v1/health", b"/v1/nope-2"]
    data = b"".join(b"GET " + p + b" HTTP/1.1\r\n" + H + b"\r\n" for p in paths)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(15)
        s.connect(d.socket)
        s.sendall(b"\r\n" + data)  # RFC 9112 2.2: an empty line before a request is ignored
        raw = b""
        while len(got := responses_prefix(raw)) < 4:
            chunk = s.recv(65536)
            assert chunk, raw
            raw += chunk
        assert [g[0] for g in got] == [200, 404, 200, 404]
        assert b"nope-1" in got[1][2] and b"nope-2" in got[3][2]
        assert all("connection" not in g[1] for g in got)
        s.sendall(HEALTH)  # still open
        raw = b""
        while not responses_prefix(raw):
            raw += s.recv(65536)
        assert responses_prefix(raw)[0][0] == 200
    finally:
        s.close()


def responses_prefix(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The complete responses at the start of ``raw`` (a partial last one is left out)."""
    cut = 0
    pos = 0
    while (end := raw.find(b"\r\n\r\n", pos)) >= 0:
        m = re.search(rb"content-length: (\d+)", raw[pos:end])
        assert m, raw[pos:end]
        if end + 4 + int(m.group(1)) > len(raw):
            break
        pos = cut = end + 4 + int(m.group(1))
    return responses(raw[:cut])


def test_body_in_pieces_and_chunked_body_reach_the_handler(d: Daemon) -> None:
    """The framing the parser accepts still delivers whole bodies: a JSON body split in
    pieces (Content-Length) and one in chunks with a trailer give the handler's own
    verdict (invalid_request on an empty object), on a connection that stays open."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(15)
        s.connect(d.socket)
        for piece in (AUTHORIZE + b"content-length: 2\r\n", b"\r\n{", b"}"):
            s.sendall(piece)
            time.sleep(0.05)
        s.sendall(AUTHORIZE + b"transfer-encoding: chunked\r\n\r\n1\r\n{\r\n1;ext=1\r\n}\r\n"
                  b"0\r\nx-trailer: t\r\n\r\n")
        raw = b""
        while len(responses_prefix(raw)) < 2:
            chunk = s.recv(65536)
            assert chunk, raw
            raw += chunk
        got = responses_prefix(raw)
        assert [g[0] for g in got] == [400, 400]
        assert all(b'"invalid_request"' in g[2] for g in got), got
    finally:
        s.close()


def test_a_long_pipeline_is_answered_in_order(d: Daemon) -> None:
    """64 KiB of tiny pipelined requests in one write (more than the daemon parses
    ahead, MAX_PARSED_AHEAD): every one answered, in order, on the same connection."""
    paths = [b"/v1/health" if i % 3 else b"/v1/n%d" % i for i in range(2200)]
    data = b"".join(b"GET " + p + b" HTTP/1.1\r\n" + H + b"\r\n" for p in paths)
    assert len(data) > 64 * 1024
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(60)
        s.connect(d.socket)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    finally:
        s.close()
    got = responses(raw)
    assert [g[0] for g in got] == [200 if i % 3 else 404 for i in range(len(paths))]
    for i in range(0, len(paths), 3):
        assert b"/v1/n%d" % i in got[i][2]


def test_parsed_ahead_is_bounded() -> None:
    """What a pipelining client makes the daemon hold: at most MAX_PARSED_AHEAD parsed
    requests plus one slice's, the rest of its receive as bytes."""
    from sidekey.server import FEED_SLICE, MAX_PARSED_AHEAD, RECEIVE_CHUNK, _Wire

    tiny = b"GET / HTTP/1.1\r\nhost:s\r\n\r\n"
    data = (tiny * (RECEIVE_CHUNK // len(tiny)))[:RECEIVE_CHUNK]
    wire = _Wire(16 * 1024, 256 * 1024, -1)
    wire.feed(data)
    bound = MAX_PARSED_AHEAD + FEED_SLICE // len(tiny) + 1
    assert MAX_PARSED_AHEAD <= len(wire.ready) <= bound
    assert len(wire.pending) <= RECEIVE_CHUNK
    answered = 0
    while wire.ready or wire.pending:
        while wire.ready:
            assert wire.ready.popleft().target == "/"
            answered += 1
        if wire.pending:
            wire.resume()
            assert len(wire.ready) <= bound
    assert answered == RECEIVE_CHUNK // len(tiny) and wire.refusal is None


def test_head_request_gets_no_body(d: Daemon) -> None:
    """A response to HEAD has a head only (content-length as for GET): a body would be
    read by the client as the next response."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(15)
        s.connect(d.socket)
        s.sendall(b"HEAD /v1/health HTTP/1.1\r\n" + H + b"\r\n" + HEALTH)
        raw = b""
        while raw.count(b"HTTP/1.1 ") < 2 or not responses_prefix(raw[raw.index(b"HTTP/1.1 ", 1):]):
            chunk = s.recv(65536)
            assert chunk, raw
            raw += chunk
    finally:
        s.close()
    first, second = raw[:raw.index(b"HTTP/1.1 ", 1)], raw[raw.index(b"HTTP/1.1 ", 1):]
    assert first.endswith(b"\r\n\r\n") and b"content-length: " in first, first
    assert first.split(b" ", 2)[1] in (b"404", b"405"), first
    assert responses(second)[0][0] == 200


def test_whitespace_padded_head_is_431(d: Daemon) -> None:
    """Whitespace before a header value is not part of the value (llhttp skips it) but
    is part of the head: 64 KiB of it, before short values, is refused like any head
    over the cap."""
    pad = b" " * 1000
    data = b"GET /v1/health HTTP/1.1\r\n" + H + b"".join(
        b"x-%d:" % i + pad + pad + b"v\r\n" for i in range(32)) + b"\r\n"
    assert len(data) > 3 * HEAD_CAP
    refused(d, data, 431, "headers_too_large")


def test_endless_empty_lines_are_refused(d: Daemon) -> None:
    """Empty lines before a request are skipped (RFC 9112 2.2), a head's worth at most:
    a client sending only CRLFs is refused, not kept until idle_timeout_s."""
    refused(d, b"\r\n" * (HEAD_CAP + 10), 400, "bad_http")
